"""The HTTP API against the seed documents themselves (``../shared/seeds``), read at test time.

The property tables are parsed from the markdown (both table styles the seeds use), so when a
seed changes, these tests say which property ticketgate lacks, rather than a copy of the seed
going stale.  Every response is checked field by field: present (``null`` allowed where
ticketgate has no data) and of the seed's type.  The seeds' sample requests are replayed as
they are written, headers and credentials included.  Last, schemathesis fuzzes the whole
OpenAPI schema against a real ``ticketgate api`` server and must never see a 5xx.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from ingest.service import Ingestor
from tests.api_helpers import ADMIN, CONFIG, SEEDS, build_client, client_for, live_server, mail

# The seeds' sample requests carry "Authorization: Basic dGplMDpUamUw" (tje0:Tje0); with this
# user they can be replayed exactly as written.
CONTRACT_CONFIG = CONFIG + """
[[api_user]]
name = "tje0"
password = "Tje0"
"""
AT_TYPES = {"integer", "string", "datetime", "boolean", "decimal", "long"}
SCHEMATHESIS_EXAMPLES = 8
SCHEMATHESIS_TIMEOUT_S = 240


# --- reading the seeds --------------------------------------------------------------------


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    context: str  # the text between the previous table and this one

    def column(self, index: int = 0) -> list[str]:
        return [row[index] for row in self.rows if len(row) > index and row[index]]

    def types(self) -> dict[str, str]:
        return {row[0]: row[1] for row in self.rows if len(row) > 1 and row[0]}


_SEPARATOR = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")


def _cells(line: str) -> list[str]:
    line = line.strip()
    line = line.removeprefix("|")
    line = line.removesuffix("|")
    return [cell.strip() for cell in line.split("|")]


def markdown_tables(text: str) -> list[Table]:
    """Pipe tables with or without outer pipes (seed 000 has them, seed 001 does not)."""
    lines = text.splitlines()
    tables: list[Table] = []
    context: list[str] = []
    i = 0
    while i < len(lines):
        if i + 1 < len(lines) and "|" in lines[i] and _SEPARATOR.match(lines[i + 1]):
            header = _cells(lines[i])
            rows = []
            j = i + 2
            while j < len(lines) and "|" in lines[j] and lines[j].strip():
                rows.append(_cells(lines[j]))
                j += 1
            tables.append(Table(header, rows, "\n".join(context)))
            context = []
            i = j
        else:
            context.append(lines[i])
            i += 1
    return tables


def seed_text(number: str) -> str:
    found = sorted(SEEDS.glob(f"{number}_*"))
    if not found:
        pytest.fail(f"seed {number} not found in {SEEDS}")
    return found[0].read_text(encoding="utf-8")


def property_table(number: str, section: str) -> Table:
    """The "Property Name" table whose preceding text mentions ``section``."""
    for table in markdown_tables(seed_text(number)):
        if table.header and table.header[0] == "Property Name" and (
                section.lower() in table.context.lower()):
            return table
    raise AssertionError(f"seed {number}: no property table after {section!r}")


def autotask_fields() -> dict[str, str]:
    """Seed 004's field definitions (not a markdown table): name -> datatype."""
    text = seed_text("004")
    section = text.split("Field definitions", 1)[1].split("Additional resources", 1)[0]
    words: list[str] = []
    depth = 0
    for word in section.split():  # drop "(8000)", "(Datto RMM integration only)"...
        if word.startswith("("):
            depth += word.count("(")
        if depth == 0:
            words.append(word)
        if depth:
            depth -= word.count(")")
    return {name: kind for name, kind in itertools.pairwise(words)
            if re.fullmatch(r"[a-z][A-Za-z0-9]*", name) and name not in AT_TYPES
            and kind in AT_TYPES}


@dataclass
class SampleRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


def sample_request(number: str) -> SampleRequest:
    text = seed_text(number)
    lines = text.split("Sample request", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"^(POST|GET) /", line))
    method, path = lines[start].split()[:2]
    headers: dict[str, str] = {}
    i = start + 1
    while i < len(lines) and re.match(r"^[A-Za-z-]+: .+$", lines[i]):
        name, _, value = lines[i].partition(": ")
        headers[name] = value.strip()
        i += 1
    rest = "\n".join(lines[i:]).lstrip()
    body = json.JSONDecoder().raw_decode(rest)[0] if rest[:1] in ("{", "[") else None
    return SampleRequest(method, path, headers, body)


def sample_response(number: str) -> Any:
    text = seed_text(number).split("Sample response", 1)[1]
    start = min(i for i in (text.find("{"), text.find("[")) if i >= 0)
    return json.JSONDecoder().raw_decode(text[start:])[0]


# --- checking values against seed types ---------------------------------------------------


def check_type(name: str, seed_type: str, value: Any) -> None:
    kind = seed_type.lower()
    if value is None:
        return  # what ticketgate has no data for is null, never missing
    if kind in ("int32", "integer", "long"):
        assert isinstance(value, int) and not isinstance(value, bool), (name, value)
    elif kind == "bool" or kind == "boolean":
        assert isinstance(value, bool), (name, value)
    elif kind in ("date-time", "datetime"):
        assert isinstance(value, str), (name, value)
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        assert parsed.tzinfo is not None, (name, value)
    elif kind == "string":
        assert isinstance(value, str), (name, value)
    elif kind == "array":
        assert isinstance(value, list), (name, value)
    elif kind == "decimal":
        assert isinstance(value, int | float) and not isinstance(value, bool), (name, value)
    else:  # object, Associate, TicketCategoryEntity, TableRight...: a JSON object
        assert isinstance(value, dict), (name, value)


def check_against(table: Table, body: dict[str, Any]) -> None:
    types = table.types()
    missing = [name for name in types if name not in body]
    assert not missing, f"properties missing from the response: {missing}"
    for name, seed_type in types.items():
        check_type(name, seed_type, body[name])


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def api(make_ingestor: Callable[..., Ingestor], tmp_path: Path
        ) -> Iterator[tuple[TestClient, Ingestor]]:
    client, ingestor = build_client(make_ingestor, tmp_path, CONTRACT_CONFIG)
    with client:
        yield client, ingestor


def post_mail(client: TestClient, **kw: Any) -> dict[str, Any]:
    response = client.post("/api/v1/Agents/CustomerService/CreateTicketFromMailData",
                           json={"MailboxId": 1, "Data": mail(**kw)})
    assert response.status_code == 200, response.text
    return dict(response.json())


# --- the parser itself ----------------------------------------------------------------------


def test_seed_tables_are_read_in_both_markdown_styles() -> None:
    assert "TicketId" in property_table("000", "Response body").column()
    request = property_table("001", "Request Body")
    response = property_table("001", "Response body")
    assert request.types()["Title"] == "String" and response.types()["Title"] == "string"
    assert "TableRight" in response.column() and "TableRight" not in request.column()
    assert len(property_table("002", "Response body").rows) > 60
    assert property_table("003", "Response body").column() == [
        "TicketId", "Title", "OwnerName", "CategoryName", "PriorityName", "TicketUrl",
        "PersonName", "ContactName", "TableRight", "FieldProperties"]
    fields = autotask_fields()
    assert len(fields) > 70 and fields["id"] == "long" and fields["title"] == "string"
    assert sample_request("003").body == {"MailboxId": 607, "Data": "autem"}


# --- responses, field by field --------------------------------------------------------------


def test_get_tickets_rows_have_every_seed_002_property(api: tuple[TestClient, Ingestor]
                                                      ) -> None:
    client, _ = api
    ticket_id = post_mail(client)["TicketId"]
    rows = client.post("/api/v1/Agents/Ticket/GetTickets",
                       json={"TicketIds": [ticket_id]}).json()
    table = property_table("002", "Response body")
    check_against(table, rows[0])
    assert set(rows[0]) == set(table.column()), "exactly the seed's properties"
    filled = {k for k, v in rows[0].items() if v is not None}
    assert {"TicketId", "Title", "CreatedAt", "OwnedBy", "OwnedByName", "Category",
            "CategoryName", "Priority", "PriorityName", "TicketStatus", "CustId",
            "PersonFullname", "ContactId", "ContactName", "NumMessages", "Deadline"} <= filled
    # $select keeps every key and nulls the rest (seed 002's query parameter).
    selected = client.post("/api/v1/Agents/Ticket/GetTickets?$select=name,department,category/id",
                           json={"TicketIds": [ticket_id]}).json()[0]
    assert set(selected) == set(table.column())
    assert selected["Category"] == rows[0]["Category"]
    assert all(v is None for k, v in selected.items() if k != "Category")


def test_ticket_info_has_the_ten_seed_003_fields(api: tuple[TestClient, Ingestor]) -> None:
    client, _ = api
    info = post_mail(client)
    table = property_table("003", "Response body")
    check_against(table, info)
    assert len(table.rows) == 10
    assert all(info[name] is not None for name in table.column())
    sample = sample_response("003")
    assert set(sample) <= set(info)
    assert {"Action", "Reason", "MessageId", "ThreadedBy"} <= set(info)


def _nested_keys(sample: dict[str, Any], key: str) -> set[str]:
    items = sample.get(key) or []
    return set(items[0]) if items else set()


def test_ticket_entities_have_every_seed_000_and_001_property(
        api: tuple[TestClient, Ingestor]) -> None:
    client, _ = api
    default = client.post("/api/v1/Agents/Ticket/CreateDefaultTicketEntity").json()
    check_against(property_table("000", "Response body"), default)
    ticket_id = post_mail(client, Cc="Olga <olga@other.example>")["TicketId"]
    saved = client.post("/api/v1/Agents/Ticket/SaveTicketEntity", json={
        "TicketId": ticket_id, "SecondaryPersons": [{"Email": "olga@other.example"}],
        "Tags": [{"Name": "vip"}]}).json()
    check_against(property_table("001", "Response body"), saved)
    check_against(property_table("000", "Response body"), saved)
    # Nested carriers have (at least) the keys of the seeds' own samples.
    for number in ("000", "001"):
        sample = sample_response(number)
        for key in ("SecondaryPersons", "Messages", "Tags"):
            wanted = _nested_keys(sample, key)
            assert saved[key], key
            assert wanted <= set(saved[key][0]), (number, key, wanted - set(saved[key][0]))
        person_keys = _nested_keys(sample, "SecondaryPersons")
        assert person_keys <= set(saved["Person"]), person_keys - set(saved["Person"])
    assert saved["Person"]["FullName"] == "Michael Thompson"
    assert saved["SecondaryPersons"][0]["ContactName"] == "Other Inc"
    assert saved["Messages"][0]["EmailHeader"] == "michael@techcorp.com"
    for key, ident in (("OwnedBy", "AssociateId"), ("Category", "TicketCategoryId"),
                       ("Priority", "TicketPriorityId"), ("Status", "TicketStatusId")):
        assert isinstance(saved[key][ident], int) and saved[key]["Name"], key
    assert saved["BaseStatus"] in ("Active", "Closed", "Postponed", "Deleted")


def test_autotask_items_have_every_seed_004_field(api: tuple[TestClient, Ingestor]) -> None:
    client, _ = api
    ticket_id = post_mail(client)["TicketId"]
    item = client.get(f"/atservicesrest/v1.0/Tickets/{ticket_id}").json()["item"]
    fields = autotask_fields()
    assert set(item) == set(fields)
    for name, kind in fields.items():
        check_type(name, kind, item[name])
        if kind == "datetime" and item[name] is not None:
            assert item[name].endswith("Z"), (name, item[name])  # UTC, seed 004
    info = {f["name"]: f for f in client.get(
        "/atservicesrest/v1.0/Tickets/entityInformation/fields").json()["fields"]}
    assert set(info) == set(fields)
    assert info["creatorType"]["isQueryable"] is False
    assert info["lastActivityPersonType"]["isQueryable"] is False


# --- the seeds' sample requests, replayed as written -----------------------------------------


def replay(client: TestClient, number: str, body: Any = ...) -> Any:
    sample = sample_request(number)
    return client.request(sample.method, sample.path, headers=sample.headers,
                          json=sample.body if body is ... else body)


def test_seed_sample_requests_replayed_as_is(api: tuple[TestClient, Ingestor]) -> None:
    _, ingestor = api
    client = client_for(ingestor, auth=None)  # the samples bring their own Authorization
    default = replay(client, "000")
    assert default.status_code == 200 and default.headers["Content-Language"] == "sv"
    assert default.json()["TicketId"] == 0

    unknown_ticket = replay(client, "001")  # TicketId 389 does not exist: no silent create
    assert unknown_ticket.status_code == 404
    assert unknown_ticket.json()["Error"]["Field"] == "TicketId"

    assert replay(client, "002").json() == []  # ids 439 and 829 are unknown: absent

    refused = replay(client, "003")
    assert refused.status_code == 400, refused.text
    error = refused.json()["Error"]
    assert (error["Code"], error["Field"]) == ("UnknownMailbox", "MailboxId")
    assert isinstance(error["InboundId"], int) and "607" in error["Message"]
    not_mail = replay(client, "003", {"MailboxId": 1, "Data": "autem"})
    assert (not_mail.status_code, not_mail.json()["Error"]["Field"]) == (400, "Data")


def test_seed_001_sample_as_a_new_ticket(api: tuple[TestClient, Ingestor]) -> None:
    _, ingestor = api
    client = client_for(ingestor, auth=None)
    body = dict(sample_request("001").body)
    body["TicketId"] = 0
    refused = replay(client, "001", body)  # it names persons and tickets that do not exist
    assert refused.status_code == 400
    assert refused.json()["Error"]["Field"] == "SecondaryPersons[0]"
    for unknown in ("SecondaryPersons", "ConnectId"):
        body.pop(unknown)
    created = replay(client, "001", body)
    assert created.status_code == 200, created.text
    entity = created.json()
    check_against(property_table("001", "Response body"), entity)
    assert entity["TicketId"] > 0 and entity["Title"] == "et"
    # "2002-12-18T14:13:41.4070755+01:00", stored and shown in UTC.
    assert entity["CreatedAt"] == "2002-12-18T13:13:41.407075+00:00"
    assert entity["Deadline"] == "2015-06-05T12:13:41.407075+00:00"
    assert entity["BaseStatus"] == "Active" and entity["Status"]["Name"] == "Open"
    assert [t["Name"] for t in entity["Tags"]] == ["Bins, Willms and Fritsch"]
    assert entity["NumMessages"] == 0 and entity["Messages"] == []  # read-only, ignored


# --- schemathesis against a real server -----------------------------------------------------


def _schemathesis() -> str:
    found = Path(sys.executable).with_name("st")
    if found.exists():
        return str(found)
    which = shutil.which("st")
    if which is None:
        pytest.fail("schemathesis (st) is not installed: pip install -e '.[test]'")
    return which


def test_schemathesis_finds_no_server_error(db_url: str, tmp_path: Path) -> None:
    with live_server(db_url, tmp_path, CONTRACT_CONFIG) as base:
        command = [
            _schemathesis(), "run", f"{base}/openapi.json",
            "--auth", ":".join(ADMIN),
            "--checks", "not_a_server_error,ignored_auth",
            "--max-examples", str(SCHEMATHESIS_EXAMPLES),
            "--phases", "examples,coverage,fuzzing",
            "--workers", "1",  # hypothesis is not thread-safe: >1 gives spurious errors
            "--seed", "20261103",
            "--generation-database", "none",
            "--request-timeout", "30",
            "--no-color",
            "--report-junit-path", str(tmp_path / "schemathesis.xml"),
        ]
        proc = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path,
                              timeout=SCHEMATHESIS_TIMEOUT_S,
                              env={**os.environ, "SCHEMATHESIS_HOOKS": ""})
    log = (tmp_path / "api-server.log").read_text(errors="replace")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:] + "\n--- server log ---\n" + log[-4000:]
    assert "Traceback" not in log, log[-4000:]
    assert re.search(r"\d+ generated, \d+ passed", output), output[-3000:]
