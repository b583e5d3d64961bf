from tests.api_helpers import build_client, mail
def test_probe(make_ingestor, tmp_path):
    client, ing = build_client(make_ingestor, tmp_path)
    cases = [
        mail(subject="nul\x00subject"),
        mail(message_id="nul\x00id@x"),
        mail(sender="Ev\x00il <evil\x00@x.example>"),
        mail(body="body with \x00 nul"),
        mail(subject="\ud800 surrogate", message_id="s1@x"),
        "Subject: " + "x" * 100000 + "\r\n\r\nbody",
        "X: y\r\n\r\n",
    ]
    for data in cases:
        r = client.post("/api/v1/Agents/CustomerService/CreateTicketFromMailData", json={"MailboxId": 1, "Data": data})
        print(r.status_code, r.json().get("Action"), (r.json().get("Reason") or "")[:100], r.json().get("Error"))
