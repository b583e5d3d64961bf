"""Deterministic generator of realistic support mail for the replay benchmark.

``generate_mails(n, seed)`` returns ``n`` RFC 822 mails as bytes, in delivery order, shaped like
the traffic of a B2B support mailbox:

* new tickets from ~200 distinct senders at ~30 company domains (plus a few free-mail users),
  some with colleagues in Cc;
* replies that thread the way real ones do: In-Reply-To/References to an agent's signed
  Message-ID and the customer's earlier mail, In-Reply-To to an earlier customer mail, a bare
  ``[#N]`` subject tag, and a few that lose every reference (or quote a stranger's ticket tag);
* multipart/alternative text+HTML in the shapes Outlook, Gmail and Apple Mail send, plain text
  from Thunderbird and Japanese mailers, quoted history under replies;
* ~15% with a 10-60 KB attachment (PDF, PNG, XLSX, log, CSV, a forwarded mail);
* auto-replies, bounces (Postfix DSN, Exchange NDR), newsletters, a vendor pitch, duplicate
  deliveries;
* utf-8 (quoted-printable, base64, 8bit), latin-1 quoted-printable and ISO-2022-JP bodies,
  RFC 2047 encoded names and subjects; 1-80 KB per mail.

The companies, persons and agents (the "world") come from a fixed seed so that ``bench.toml``,
written by ``render_config()``, matches every mail stream; ``seed`` varies only the stream.
Ticket ids in ``[#N]`` tags are predicted from the expected outcome of every earlier mail, so
they are right when the stream is replayed into an empty database.

    python bench/generate.py --n 2000 --stats          # what the stream looks like
    python bench/generate.py --write-config            # rewrite bench/bench.toml
    python bench/generate.py --n 50 --out /tmp/mails   # write .eml files
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import hmac
import html
import math
import random
import statistics
import sys
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from email import charset as email_charset
from email.generator import BytesGenerator
from email.header import Header
from email.message import Message
from email.mime.application import MIMEApplication
from email.mime.base import MIMEBase
from email.mime.image import MIMEImage
from email.mime.message import MIMEMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import compat32
from io import BytesIO
from pathlib import Path

DEFAULT_SEED = 20240305
WORLD_SEED = 7  # companies, persons, agents: fixed, so bench.toml fits every stream
CONFIG_PATH = Path(__file__).with_name("bench.toml")

SUPPORT = "support@helpdesk.example"
BILLING = "billing@helpdesk.example"
OUR_DOMAIN = "helpdesk.example"
MESSAGE_ID_DOMAIN = "mail.helpdesk.example"
SECRET = "bench-secret-not-for-production"
MIN_SIZE = 1024
MAX_SIZE = 80 * 1024

# --------------------------------------------------------------------------------------------
# The world: companies, persons, agents
# --------------------------------------------------------------------------------------------

COMPANY_NAMES = [
    ("Globex", "globex.example"), ("Initech", "initech.example"),
    ("Umbrella Logistics", "umbrella-logistics.example"),
    ("Stark Components", "stark-comp.example"), ("Wayne Facilities", "wayne-facilities.example"),
    ("Hooli Cloud", "hooli.example"), ("Vandelay Industries", "vandelay.example"),
    ("Soylent Foods", "soylent.example"), ("Tyrell Systems", "tyrell.example"),
    ("Cyberdyne Robotics", "cyberdyne.example"), ("Aperture Labs", "aperture.example"),
    ("Black Mesa Research", "blackmesa.example"),
    ("Nordwind Handel GmbH", "nordwind-handel.example"),
    ("Müller & Söhne KG", "mueller-soehne.example"),
    ("Bäckerei Schröder", "schroeder-backwaren.example"),
    ("Alpenblick Hotels", "alpenblick.example"),
    ("Rheinland Versicherung", "rheinland-vers.example"),
    ("Société Générale de Câbles", "sgc-cables.example"),
    ("Boulangerie Lefèvre", "lefevre-boulangerie.example"),
    ("Château Vignobles", "chateau-vignobles.example"),
    ("Transportes Ibéricos", "transportes-ibericos.example"),
    ("Clínica Santa Ana", "clinica-santaana.example"), ("Yamato Seiki", "yamato-seiki.example"),
    ("Sakura Trading", "sakura-trading.example"), ("Fujimoto Denki", "fujimoto-denki.example"),
    ("Northwind Traders", "northwind.example"), ("Contoso Retail", "contoso-retail.example"),
    ("Fabrikam Health", "fabrikam-health.example"), ("Tailspin Toys", "tailspin.example"),
    ("Woodgrove Bank", "woodgrove.example"),
]  # fmt: skip
LOCALE_OF_COMPANY = {  # index ranges into COMPANY_NAMES
    **{i: "en" for i in range(12)}, **{i: "de" for i in range(12, 17)},
    **{i: "fr" for i in range(17, 20)}, **{i: "es" for i in range(20, 22)},
    **{i: "ja" for i in range(22, 25)}, **{i: "en" for i in range(25, 30)},
}  # fmt: skip
FREEMAIL = ["freemail.example", "webpost.example", "mailbox.example"]

FIRST = {
    "en": ["James", "Mary", "Robert", "Patricia", "Michael", "Jennifer", "David", "Linda", "Sarah",
           "Daniel", "Emily", "Thomas", "Jessica", "Kevin", "Laura", "Brian", "Olivia", "Ryan"],
    "de": ["Jürgen", "Sören", "Anja", "Björn", "Katrin", "Matthias", "Jörg", "Ute", "Lena",
           "Günther", "Sabine", "Tobias"],
    "fr": ["Hélène", "François", "Amélie", "Jérôme", "Céline", "Stéphane", "Noémie", "Loïc"],
    "es": ["José", "María", "Iñigo", "Lucía", "Andrés", "Begoña", "Raúl", "Sofía"],
    "ja": ["太郎", "花子", "健一", "美咲", "大輔", "由美", "誠", "恵子"],
}  # fmt: skip
LAST = {
    "en": ["Smith", "Johnson", "Brown", "Miller", "Davis", "Wilson", "Taylor", "Clark", "Lewis",
           "Walker", "Hall", "Young", "King", "Wright", "Scott", "Green"],
    "de": ["Müller", "Schröder", "Weiß", "Köhler", "Bäcker", "Groß", "Hoffmann", "Krüger",
           "Schäfer", "Wagner"],
    "fr": ["Lefèvre", "Dupré", "Bérard", "Moreau", "Girard", "Rousseau", "Faure", "Lemaître"],
    "es": ["García", "Martínez", "López", "Sánchez", "Pérez", "Gómez", "Muñoz", "Jiménez"],
    "ja": ["佐藤", "鈴木", "高橋", "田中", "渡辺", "伊藤", "山本", "中村"],
}  # fmt: skip
ROMAJI = {
    "太郎": "taro", "花子": "hanako", "健一": "kenichi", "美咲": "misaki", "大輔": "daisuke",
    "由美": "yumi", "誠": "makoto", "恵子": "keiko", "佐藤": "sato", "鈴木": "suzuki",
    "高橋": "takahashi", "田中": "tanaka", "渡辺": "watanabe", "伊藤": "ito", "山本": "yamamoto",
    "中村": "nakamura",
}  # fmt: skip
AGENTS = [
    ("sarah", "Sarah", "Johnson"), ("tom", "Tom", "Baker"), ("lena", "Lena", "Vogel"),
    ("kenji", "Kenji", "Mori"), ("claire", "Claire", "Dubois"), ("triage", "Support", "Triage"),
]  # fmt: skip
TITLES = ["IT Manager", "Head of Finance", "Operations Lead", "System Administrator",
          "Accounts Payable", "Office Manager", "Project Manager", "CTO", "Purchasing"]


@dataclass(slots=True)
class Company:
    name: str
    domains: list[str]
    locale: str
    disclaimer: bool


@dataclass(slots=True)
class Person:
    first: str
    last: str
    email: str
    locale: str
    company: Company | None
    known: bool  # listed in bench.toml as a [[person]]
    client: str  # outlook | gmail | apple | thunderbird | jmailer
    title: str

    @property
    def display(self) -> str:
        if self.locale == "ja":
            return f"{self.last} {self.first}"
        return f"{self.first} {self.last}"


@dataclass(slots=True)
class World:
    companies: list[Company]
    persons: list[Person]


def _ascii(text: str) -> str:
    """The address form of a name: Jürgen -> juergen, Hélène -> helene, 太郎 -> taro."""
    text = ROMAJI.get(text, text).translate(str.maketrans({"ä": "ae", "ö": "oe", "ü": "ue",
                                                           "ß": "ss"}))
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()


def build_world() -> World:
    rng = random.Random(WORLD_SEED)
    companies = []
    for index, (name, domain) in enumerate(COMPANY_NAMES):
        domains = [domain]
        if index % 7 == 3:  # a second brand domain
            domains.append(domain.replace(".example", "-group.example"))
        companies.append(Company(name, domains, LOCALE_OF_COMPANY[index], index % 4 == 1))
    persons: list[Person] = []
    seen: set[str] = set()
    while len(persons) < 200:
        freemail = len(persons) % 9 == 8  # ~22 private senders
        company = None if freemail else companies[rng.randrange(len(companies))]
        locale = company.locale if company else rng.choice(["en", "en", "de", "fr", "ja"])
        first, last = rng.choice(FIRST[locale]), rng.choice(LAST[locale])
        pattern = rng.randrange(3)
        local = (f"{_ascii(first)}.{_ascii(last)}", f"{_ascii(first)[0]}.{_ascii(last)}",
                 _ascii(first))[pattern]  # fmt: skip
        if company is None:
            domain = rng.choice(FREEMAIL)
            local += str(rng.randrange(10, 99))
        else:
            domain = company.domains[0] if rng.random() < 0.8 else rng.choice(company.domains)
            if rng.random() < 0.08:  # mail from a subdomain: contact found by parent domain
                domain = "mail." + domain
        email = f"{local}@{domain}"
        if email in seen:
            continue
        seen.add(email)
        if locale == "ja":
            client = rng.choice(["jmailer", "jmailer", "outlook"])
        else:
            client = rng.choices(["outlook", "gmail", "apple", "thunderbird"], [5, 3, 1, 1])[0]
        persons.append(Person(first, last, email, locale, company, rng.random() < 0.6, client,
                              rng.choice(TITLES)))
    return World(companies, persons)


def render_config(world: World | None = None) -> str:
    """The bench.toml matching the world (contacts, persons, agents, mailbox, rules)."""
    world = world or build_world()

    def q(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    out = [
        "# Configuration for the replay benchmark (bench/replay_bench.py).",
        "# Written by `python bench/generate.py --write-config`; do not edit by hand: the",
        "# generated mails are built from the same companies, persons and agents.",
        "",
        "[service]",
        'base_url = "https://helpdesk.example"',
        'unknown_sender = "create"',
        'reopen_closed = "reopen"',
        f"message_id_domain = {q(MESSAGE_ID_DOMAIN)}",
        f"secret = {q(SECRET)}",
        "",
    ]
    for name, first, last in AGENTS:
        out += ["[[associate]]", f"name = {q(name)}", f"full_name = {q(first + ' ' + last)}",
                f"email = {q(name + '@' + OUR_DOMAIN)}", ""]
    for name in ("Technical Support", "Billing", "Sales", "Account", "General"):
        out += ["[[category]]", f"name = {q(name)}", ""]
    for name, hours in (("Low", None), ("Medium", 24), ("High", 8), ("Urgent", 2)):
        out += ["[[priority]]", f"name = {q(name)}"]
        out += [f"deadline_hours = {hours}"] if hours else []
        out += [""]
    for company in world.companies:
        out += ["[[contact]]", f"name = {q(company.name)}",
                "domains = [" + ", ".join(q(d) for d in company.domains) + "]", ""]
    for person in world.persons:
        if not person.known:
            continue
        out += ["[[person]]", f"first_name = {q(person.first)}", f"last_name = {q(person.last)}",
                f"email = {q(person.email)}"]
        out += [f"contact = {q(person.company.name)}"] if person.company else []
        out += [""]
    out += [
        "[[mailbox]]",
        "id = 1",
        'name = "Support"',
        f"addresses = [{q(SUPPORT)}, {q(BILLING)}]",
        'category = "Technical Support"',
        'priority = "Medium"',
        'owner = "triage"',
        "",
        "# Rules: first match wins unless `continue = true`.",
        "[[rule]]",
        'name = "outage"',
        "match = { subject = '(?i)\\b(urgent|down|outage|critical|dringend|urgente)\\b' }",
        'set = { priority = "Urgent", tags = ["urgent"] }',
        "continue = true",
        "",
        "[[rule]]",
        'name = "vendor-pitch"',
        "match = { from_domain = '^(promo|news)\\.vendor\\.example$' }",
        'action = "ignore"',
        "",
        "[[rule]]",
        'name = "billing"',
        "match = { subject = "
        "'(?i)\\b(invoice|billing|payment|refund|rechnung|facture|factura)\\b' }",
        'set = { category = "Billing", priority = "High", owner = "tom", tags = ["billing"] }',
        "",
        "[[rule]]",
        'name = "billing-address"',
        "match = { to = '^billing@helpdesk\\.example$' }",
        'set = { category = "Billing", owner = "tom" }',
        "",
        "[[rule]]",
        'name = "churn"',
        "match = { body = '(?i)cancel (my|our) (subscription|contract)' }",
        'set = { category = "Sales", owner = "sarah", tags = ["churn-risk"] }',
        "",
        "[[rule]]",
        'name = "vip"',
        "match = { from_domain = '^(globex|initech|woodgrove)\\.example$' }",
        "unless = { subject = '(?i)newsletter' }",
        'set = { owner = "sarah", priority = "High", tags = ["vip"] }',
        "",
        "[[rule]]",
        'name = "high-importance"',
        "match = { header.X-Priority = '^1' }",
        'set = { priority = "High" }',
        "",
        "[[rule]]",
        'name = "japan-desk"',
        "match = { from_domain = '(yamato-seiki|sakura-trading|fujimoto-denki)\\.example$' }",
        'set = { owner = "kenji" }',
        "",
    ]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------

SENTENCES = {
    "en": [
        "Since this morning none of our users can log in to the customer portal.",
        "We get the error \"Session expired\" immediately after entering the password.",
        "The export to CSV stops at about 80 percent and never finishes.",
        "I have attached a screenshot of the error message.",
        "We upgraded to version {ver} last night and since then the sync fails.",
        "Our accounting department needs a corrected invoice with our new VAT number.",
        "Is it possible to add three more licences to our subscription?",
        "The API returns HTTP 502 for roughly one request in ten.",
        "Please reset the two-factor authentication for our colleague {colleague}.",
        "The mobile app crashes when opening the reports tab on Android 14.",
        "We did not receive the password reset e-mail, not even in the spam folder.",
        "This is blocking our month-end closing, so a quick answer would be appreciated.",
        "Unfortunately the workaround did not help, the error is still there.",
        "Could we schedule a short call tomorrow between 10 and 12?",
        "Our order number is {order}.",
        "The webhook deliveries to our endpoint have been failing since {date}.",
        "Printing delivery notes produces an empty page after the first one.",
        "The dashboard shows the wrong time zone for all entries.",
        "When will the fix be available in the production environment?",
        "Single sign-on with our Azure tenant stopped working after the certificate renewal.",
        "Several users report that the search returns no results for older documents.",
        "The import of {n} customer records took more than two hours.",
        "We are being charged for users that were deactivated in {month}.",
        "It happens in Chrome and Edge, but not in Firefox.",
        "We already cleared the browser cache and tried a private window.",
        "The scheduled report was not sent on Monday, the previous weeks were fine.",
        "Could you please tell me which IP addresses we need to allow in our firewall?",
        "The numbers in the PDF differ from the ones shown on screen.",
        "Our auditors ask for a copy of your current ISO 27001 certificate.",
        "We’d like to understand why the storage quota jumped from 40 GB to 95 GB.",
    ],
    "de": [
        "Seit heute Morgen können sich unsere Mitarbeiter nicht mehr anmelden.",
        "Die Rechnung {inv} wurde leider doppelt abgebucht.",
        "Beim Export nach Excel erscheint eine Fehlermeldung über ungültige Zeichen.",
        "Könnten Sie bitte prüfen, warum die Synchronisation seit dem Update fehlschlägt?",
        "Anbei finden Sie einen Screenshot der Fehlermeldung.",
        "Das Problem tritt nur bei Benutzern mit Umlauten im Namen auf (z. B. Jürgen Größer).",
        "Wir benötigen eine korrigierte Rechnung mit unserer neuen Umsatzsteuer-ID.",
        "Leider besteht das Problem weiterhin, auch nach dem Neustart.",
        "Die Lieferscheine werden ab der zweiten Seite leer gedruckt.",
        "Bitte setzen Sie die Zwei-Faktor-Authentifizierung für {colleague} zurück.",
        "Für uns ist das dringend, da der Monatsabschluss davon abhängt.",
        "Können wir morgen zwischen 10 und 12 Uhr kurz telefonieren?",
        "Unsere Bestellnummer lautet {order}.",
        "Die Berichte zeigen seit der Zeitumstellung falsche Uhrzeiten an.",
        "Wir möchten drei weitere Lizenzen für unsere Außendienstmitarbeiter bestellen.",
        "Die Schnittstelle liefert für etwa jede zehnte Anfrage einen Fehler 502.",
    ],
    "fr": [
        "Depuis ce matin, nos utilisateurs ne peuvent plus se connecter au portail.",
        "La facture {inv} a été débitée deux fois.",
        "Pourriez-vous vérifier pourquoi la synchronisation échoue depuis la mise à jour ?",
        "Vous trouverez ci-joint une capture d'écran du message d'erreur.",
        "Malheureusement, le problème persiste après le redémarrage.",
        "L'export vers Excel s'arrête à environ 80 % et ne se termine jamais.",
        "Notre numéro de commande est {order}.",
        "Nous souhaitons ajouter trois licences supplémentaires à notre abonnement.",
        "C'est assez urgent car la clôture mensuelle en dépend.",
        "Les bons de livraison s'impriment avec une page blanche après la première.",
        "Le tableau de bord affiche un mauvais fuseau horaire pour toutes les entrées.",
        "Pouvons-nous prévoir un court échange téléphonique demain matin ?",
    ],
    "es": [
        "Desde esta mañana nuestros usuarios no pueden iniciar sesión en el portal.",
        "La factura {inv} se ha cobrado dos veces.",
        "¿Podrían revisar por qué falla la sincronización desde la actualización?",
        "Adjunto una captura de pantalla del error.",
        "Lamentablemente el problema continúa después de reiniciar.",
        "Nuestro número de pedido es {order}.",
        "Necesitamos una factura corregida con nuestro nuevo NIF.",
        "La exportación a Excel se detiene alrededor del 80 % y nunca termina.",
        "¿Sería posible añadir tres licencias más a nuestra suscripción?",
        "Es bastante urgente porque el cierre del mes depende de ello.",
    ],
    "ja": [
        "今朝からポータルにログインできなくなりました。",
        "請求書{inv}が二重に請求されているようです。",
        "アップデート後に同期が失敗するようになりました。",
        "エラーメッセージのスクリーンショットを添付いたします。",
        "至急ご確認いただけますでしょうか。",
        "残念ながら、まだ同じエラーが発生しております。",
        "注文番号は{order}です。",
        "ライセンスを三つ追加したいと考えております。",
        "エクスポートが八十パーセント付近で止まってしまいます。",
        "明日の午前中にお電話でご相談できますでしょうか。",
        "帳票の二ページ目以降が白紙で印刷されます。",
    ],
}  # fmt: skip
SUBJECTS = {
    "en": ["Cannot log in to the portal", "Invoice {inv} charged twice",
           "CSV export never finishes",
           "Sync fails after upgrade to {ver}", "Question about our subscription",
           "URGENT: API returning 502 errors", "Password reset mail not arriving",
           "Mobile app crashes on reports tab", "Request for corrected invoice",
           "Webhook deliveries failing", "Wrong time zone in dashboard",
           "SSO stopped working after certificate renewal", "Search misses older documents",
           "Add three licences", "Outage: portal down for all users", "Storage quota question",
           "Firewall allow-list for your service", "Refund for deactivated users",
           "Scheduled report not sent", "Copy of ISO 27001 certificate"],
    "de": ["Anmeldung nicht möglich", "Rechnung {inv} doppelt abgebucht",
           "Fehler beim Export nach Excel", "Synchronisation schlägt fehl",
           "Dringend: Portal nicht erreichbar", "Zusätzliche Lizenzen für Außendienst",
           "Korrektur der Rechnung – neue USt-ID", "Leere Seiten beim Drucken der Lieferscheine"],
    "fr": ["Impossible de se connecter", "Facture {inv} débitée deux fois",
           "Échec de la synchronisation", "Licences supplémentaires", "Problème d'export Excel",
           "Urgent : portail inaccessible"],
    "es": ["No podemos iniciar sesión", "Factura {inv} cobrada dos veces",
           "Fallo de sincronización", "Licencias adicionales", "Urgente: portal caído"],
    "ja": ["ログインできません", "請求書{inv}について", "同期エラーについて",
           "ライセンス追加のお願い",
           "【至急】ポータルに接続できません", "帳票印刷の不具合について"],
}  # fmt: skip
GREETING = {
    "en": ["Hello,", "Hi team,", "Dear Support,", "Good morning,", "Hi {agent},"],
    "de": ["Hallo,", "Sehr geehrte Damen und Herren,", "Guten Tag,", "Hallo {agent},"],
    "fr": ["Bonjour,", "Madame, Monsieur,", "Bonjour {agent},"],
    "es": ["Hola,", "Buenos días,", "Estimado equipo de soporte:"],
    "ja": ["ヘルプデスク御中", "サポートご担当者様"],
}  # fmt: skip
CLOSING = {
    "en": ["Best regards,", "Kind regards,", "Thanks,", "Many thanks in advance,", "Cheers,"],
    "de": ["Mit freundlichen Grüßen", "Viele Grüße", "Beste Grüße"],
    "fr": ["Cordialement,", "Bien à vous,", "Merci d'avance,"],
    "es": ["Saludos cordiales,", "Un saludo,", "Gracias de antemano,"],
    "ja": ["よろしくお願いいたします。"],
}  # fmt: skip
FOLLOW_UP = {
    "en": ["Thanks for the quick reply, that solved the problem for most of our users.",
           "Any update on this? We are still affected.",
           "I can confirm that it works again, you can close the ticket.",
           "Unfortunately the workaround did not help, the error is still there.",
           "Please see the additional details below."],
    "de": ["Vielen Dank für die schnelle Rückmeldung, jetzt funktioniert es wieder.",
           "Gibt es hierzu schon Neuigkeiten?", "Leider besteht das Problem weiterhin."],
    "fr": ["Merci pour votre réponse rapide, le problème est résolu.",
           "Avez-vous des nouvelles à ce sujet ?", "Malheureusement, le problème persiste."],
    "es": ["Muchas gracias por la rápida respuesta, ya funciona.",
           "¿Hay alguna novedad?", "Lamentablemente el problema continúa."],
    "ja": ["早速のご回答ありがとうございます。問題は解決しました。",
           "その後の状況はいかがでしょうか。", "残念ながら、まだ同じエラーが発生しております。"],
}  # fmt: skip
AGENT_TEXT = [
    "thank you for contacting us. We have forwarded your request to our second-level team "
    "and will get back to you as soon as possible.",
    "could you please send us the exact time the error occurred and, if possible, a HAR file "
    "recorded in the browser's developer tools?",
    "we have deployed a fix for the issue you reported. Please try again and let us know if "
    "the problem persists.",
    "the corrected invoice is attached to this message. We apologise for the inconvenience.",
    "our engineers identified a configuration problem on your tenant and corrected it.",
]
DISCLAIMER = (
    "CONFIDENTIALITY NOTICE: This e-mail and any attachments are confidential and may be "
    "privileged. If you are not the intended recipient, please notify the sender immediately "
    "and delete this message from your system. Any unauthorised use, disclosure or copying is "
    "strictly prohibited. {company} accepts no liability for damage caused by any virus "
    "transmitted by this e-mail. Registered office: {company}, company number {order}."
)
CHARSET_OF = {"en": "utf-8", "de": "iso-8859-1", "fr": "iso-8859-1", "es": "iso-8859-1",
              "ja": "iso-2022-jp"}  # fmt: skip
TZ_OF = {"en": -5, "de": 1, "fr": 1, "es": 1, "ja": 9}
RE_PREFIX = {"en": "RE: ", "de": "AW: ", "fr": "RE : ", "es": "RE: ", "ja": "Re: "}
FWD_PREFIX = {"en": "FW: ", "de": "WG: ", "fr": "TR : ", "es": "RV: ", "ja": "Fw: "}
AUTO_REPLY = {
    "en": ("Automatic reply: {subject}",
           "I am out of the office until {date} with limited access to e-mail. For urgent "
           "matters please contact {colleague}."),
    "de": ("Automatische Antwort: {subject}",
           "Ich bin bis zum {date} nicht im Büro und habe nur eingeschränkt Zugriff auf meine "
           "E-Mails. In dringenden Fällen wenden Sie sich bitte an {colleague}."),
    "fr": ("Réponse automatique : {subject}",
           "Je suis absent(e) jusqu'au {date}. Pour toute demande urgente, veuillez contacter "
           "{colleague}."),
    "es": ("Respuesta automática: {subject}",
           "Estoy fuera de la oficina hasta el {date}. Para asuntos urgentes, contacte con "
           "{colleague}."),
    "ja": ("自動応答: {subject}",
           "{date}まで不在にしております。お急ぎの場合は{colleague}までご連絡ください。"),
}  # fmt: skip
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
LOG_MESSAGES = [
    "Connection reset by peer while reading response header from upstream",
    "Request timed out after 30000 ms (GET /api/v2/orders?page=17)",
    "javax.net.ssl.SSLHandshakeException: PKIX path building failed",
    "Sync job 4711 finished with 3 errors, 12 warnings",
    "User import: row 1042 rejected, invalid e-mail address",
    "Token refresh failed: invalid_grant (AADSTS70008)",
    "Worker heartbeat missed, restarting consumer group 'exports'",
    "Disk usage on /var/lib/app at 91%",
]


def _fits(text: str, charset: str) -> str:
    """``charset`` if it can carry ``text``, else utf-8 (what mailers fall back to)."""
    try:
        text.encode(charset)
    except UnicodeEncodeError:
        return "utf-8"
    return charset


def _b64ish(rng: random.Random, length: int) -> str:
    return base64.b64encode(rng.randbytes(length * 3 // 4 + 3)).decode()[:length]


# --------------------------------------------------------------------------------------------
# The stream
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Thread:
    ticket_id: int
    subject: str
    person: Person
    cc: list[Person]
    locale: str
    customer_ids: list[str] = field(default_factory=list)  # Message-IDs stored on the ticket
    history: list[tuple[str, str, dt.datetime, str]] = field(default_factory=list)
    agent_replies: int = 0


@dataclass(slots=True)
class GeneratedMail:
    raw: bytes
    kind: str
    expect: str  # created | appended | ignored | duplicate (the outcome the stream assumes)
    ticket_id: int | None = None


def _signed_message_id(ticket_id: int, unique: str) -> str:
    """What ticketgate writes on its outgoing mail (ingest.tokens.outgoing_message_id)."""
    mac = hmac.new(SECRET.encode(), f"{ticket_id}.{unique}".encode(), hashlib.sha256)
    return f"tg.{ticket_id}.{unique}.{mac.hexdigest()[:16]}@{MESSAGE_ID_DOMAIN}"


class Stream:
    """Builds the mails one by one; keeps the threads and the predicted ticket ids."""

    def __init__(self, seed: int, world: World) -> None:
        self.rng = random.Random(seed)
        self.world = world
        self.threads: list[Thread] = []
        self.next_ticket = 1
        self.clock = dt.datetime(2024, 3, 4, 7, 30, tzinfo=dt.UTC)
        self.sent: list[GeneratedMail] = []
        self.company_people: dict[str, list[Person]] = {}
        self.by_locale: dict[str, list[Person]] = {}
        for person in world.persons:
            self.by_locale.setdefault(person.locale, []).append(person)
            if person.company is not None:
                self.company_people.setdefault(person.company.name, []).append(person)
        # A few people write a lot, most write now and then (weights 1/sqrt(rank)).
        order = list(world.persons)
        random.Random(WORLD_SEED + 1).shuffle(order)
        self.sender_order = order
        self.sender_weights = [1 / math.sqrt(rank) for rank in range(1, len(order) + 1)]

    # --- small helpers ---------------------------------------------------------------------

    def tick(self) -> dt.datetime:
        self.clock += dt.timedelta(seconds=self.rng.randrange(20, 600))
        return self.clock

    def fill(self, text: str, locale: str = "en") -> str:
        rng = self.rng
        if "{" not in text:
            return text
        return text.format(
            inv=f"INV-{rng.randrange(2023000, 2024999)}", order=f"PO-{rng.randrange(10000, 99999)}",
            ver=f"{rng.randrange(3, 9)}.{rng.randrange(0, 20)}.{rng.randrange(0, 9)}",
            colleague=rng.choice(self.by_locale[locale]).display, n=rng.randrange(2, 90) * 1000,
            month=rng.choice(MONTHS), date=f"{rng.randrange(1, 28)} {rng.choice(MONTHS)}",
            agent=rng.choice(AGENTS)[1],
        )

    def message_id(self, person: Person) -> str:
        rng = self.rng
        domain = person.email.rpartition("@")[2]
        if person.client == "outlook":
            host = f"AM{rng.randrange(0, 9)}PR{rng.randrange(10, 99)}MB{rng.randrange(1000, 9999)}"
            return (f"{host}{_b64ish(rng, 12).upper().replace('/', 'A').replace('+', 'B')}"
                    f"@{host}.eurprd0{rng.randrange(1, 9)}.prod.outlook.com")
        if person.client == "gmail":
            return f"CA{_b64ish(rng, 40).replace('/', '_')}@mail.gmail.com"
        if person.client == "apple":
            return f"{rng.randbytes(16).hex().upper()}@{domain}"
        uuid_like = f"{rng.randbytes(4).hex()}-{rng.randbytes(2).hex()}-{rng.randbytes(6).hex()}"
        return f"{uuid_like}@{domain}"

    def boundary(self, client: str) -> str:
        rng = self.rng
        if client == "outlook":
            return f"_000_{_b64ish(rng, 30).replace('/', 'x').replace('+', 'y')}_"
        if client == "gmail":
            return "0000000000" + rng.randbytes(8).hex()
        if client == "apple":
            return f"Apple-Mail={rng.randbytes(16).hex().upper()}"
        return f"------------{_b64ish(rng, 24).replace('/', '0').replace('+', '1')}"

    def sentences(self, locale: str, count: int) -> str:
        pool = SENTENCES[locale]
        picked = [self.fill(self.rng.choice(pool), locale) for _ in range(count)]
        joiner = "" if locale == "ja" else " "
        paragraphs, i = [], 0
        while i < len(picked):
            step = self.rng.randrange(1, 5)
            paragraphs.append(joiner.join(picked[i : i + step]))
            i += step
        return "\n\n".join(paragraphs)

    def log_paste(self, lines: int) -> str:
        rng = self.rng
        stamp = self.clock - dt.timedelta(hours=3)
        out = []
        for _ in range(lines):
            stamp += dt.timedelta(milliseconds=rng.randrange(5, 9000))
            level = rng.choice(["INFO", "INFO", "INFO", "WARN", "ERROR"])
            out.append(f"{stamp:%Y-%m-%d %H:%M:%S},{stamp.microsecond // 1000:03d} {level:5} "
                       f"[worker-{rng.randrange(1, 16)}] {rng.choice(LOG_MESSAGES)}")
        return "\n".join(out)

    def signature(self, person: Person) -> str:
        company = person.company
        lines = ["", person.display, person.title]
        if company:
            rng = self.rng
            phone = (f"+{rng.randrange(1, 90)} {rng.randrange(100, 999)} "
                     f"{rng.randrange(100000, 9999999)}")
            lines += [company.name, f"Tel. {phone}", f"https://www.{company.domains[0]}"]
            if company.disclaimer:
                lines += ["", self.fill(DISCLAIMER.replace("{company}", company.name), "en")]
        return "\n".join(lines)

    def body(self, person: Person, text: str, greet: bool = True) -> str:
        locale = person.locale
        parts = [self.fill(self.rng.choice(GREETING[locale]), locale), ""] if greet else []
        parts += [text, "", self.rng.choice(CLOSING[locale]), self.signature(person)]
        return "\n".join(parts)

    def date_header(self, when: dt.datetime, locale: str) -> str:
        local = when.astimezone(dt.timezone(dt.timedelta(hours=TZ_OF[locale])))
        return local.strftime("%a, %d %b %Y %H:%M:%S %z")

    def quote_header(self, locale: str, client: str, name: str, addr: str, when: dt.datetime,
                     subject: str, to: str) -> str:
        local = when.astimezone(dt.timezone(dt.timedelta(hours=TZ_OF[locale])))
        if client == "outlook" or self.rng.random() < 0.2:
            labels = {"en": ("From", "Sent", "To", "Subject"),
                      "de": ("Von", "Gesendet", "An", "Betreff"),
                      "fr": ("De ", "Envoyé ", "À ", "Objet "),
                      "es": ("De", "Enviado", "Para", "Asunto"),
                      "ja": ("差出人", "送信日時", "宛先", "件名")}[locale]  # fmt: skip
            sent = (f"{WEEKDAYS[local.weekday()]}, {MONTHS[local.month - 1]} {local.day}, "
                    f"{local.year} {local:%I:%M %p}")
            return ("________________________________\n"
                    f"{labels[0]}: {name} <{addr}>\n{labels[1]}: {sent}\n{labels[2]}: {to}\n"
                    f"{labels[3]}: {subject}\n")
        if locale == "de":
            return f"Am {local:%d.%m.%Y} um {local:%H:%M} schrieb {name} <{addr}>:\n"
        if locale == "fr":
            return f"Le {local:%d/%m/%Y} à {local:%H:%M}, {name} <{addr}> a écrit :\n"
        if locale == "es":
            return f"El {local:%d/%m/%Y} a las {local:%H:%M}, {name} (<{addr}>) escribió:\n"
        if locale == "ja":
            return f"{local.year}年{local.month}月{local.day}日 {local:%H:%M} {name} <{addr}>:\n"
        return f"On {local:%a, %d %b %Y at %H:%M}, {name} <{addr}> wrote:\n"

    # --- MIME ------------------------------------------------------------------------------

    def body_charset(self, locale: str) -> tuple[str, str | None]:
        """The charset a mailer picks for this mail, and the transfer encoding for utf-8."""
        rng = self.rng
        name = CHARSET_OF[locale]
        if rng.random() < (0.3 if locale == "ja" else 0.35):
            name = "utf-8"
        return name, rng.choice([email_charset.QP, email_charset.QP, email_charset.BASE64, None])

    def text_part(self, text: str, charset: tuple[str, str | None],
                  subtype: str = "plain") -> MIMEText:
        rng = self.rng
        name = _fits(text, charset[0])
        cs = email_charset.Charset(name)
        if name == "utf-8":
            cs.body_encoding = charset[1]
        part = MIMEText(text, subtype, cs)  # type: ignore[arg-type]
        if subtype == "plain" and rng.random() < 0.2:
            part.set_param("format", "flowed")
        return part

    def html_of(self, text: str, client: str, quoted_html: str = "") -> str:
        paragraphs = [html.escape(p).replace("\n", "<br>\n") for p in text.split("\n\n")]
        if client == "outlook":
            body = "\n".join(
                f'<p class="MsoNormal"><span style=\'font-size:11.0pt;font-family:"Calibri",'
                f"sans-serif;color:#1F497D'>{p}<o:p></o:p></span></p>"
                for p in paragraphs
            )
            return (
                '<html xmlns:v="urn:schemas-microsoft-com:vml" '
                'xmlns:o="urn:schemas-microsoft-com:office:office" '
                'xmlns:w="urn:schemas-microsoft-com:office:word" '
                'xmlns:m="http://schemas.microsoft.com/office/2004/12/omml" '
                'xmlns="http://www.w3.org/TR/REC-html40">\n<head>\n'
                '<meta http-equiv="Content-Type" content="text/html; charset=utf-8">\n'
                '<meta name="Generator" content="Microsoft Word 15 (filtered medium)">\n'
                "<style><!--\n/* Font Definitions */\n@font-face\n\t{font-family:\"Cambria Math\";"
                "\n\tpanose-1:2 4 5 3 5 4 6 3 2 4;}\n@font-face\n\t{font-family:Calibri;\n\t"
                "panose-1:2 15 5 2 2 2 4 3 2 4;}\n/* Style Definitions */\np.MsoNormal, "
                "li.MsoNormal, div.MsoNormal\n\t{margin:0cm;\n\tfont-size:11.0pt;\n\t"
                "font-family:\"Calibri\",sans-serif;\n\tmso-fareast-language:EN-US;}\n"
                "a:link, span.MsoHyperlink\n\t{mso-style-priority:99;\n\tcolor:#0563C1;\n\t"
                "text-decoration:underline;}\nspan.EmailStyle17\n\t{mso-style-type:personal-compose;"
                "\n\tfont-family:\"Calibri\",sans-serif;\n\tcolor:windowtext;}\n.MsoChpDefault\n\t"
                "{mso-style-type:export-only;\n\tfont-family:\"Calibri\",sans-serif;}\n"
                "@page WordSection1\n\t{size:612.0pt 792.0pt;\n\t"
                "margin:72.0pt 72.0pt 72.0pt 72.0pt;}"
                "\ndiv.WordSection1\n\t{page:WordSection1;}\n--></style><!--[if gte mso 9]><xml>\n"
                '<o:shapedefaults v:ext="edit" spidmax="1026" />\n</xml><![endif]-->\n</head>\n'
                '<body lang="EN-US" link="#0563C1" vlink="#954F72" style="word-wrap:break-word">\n'
                f'<div class="WordSection1">\n{body}\n'
                f'<p class="MsoNormal"><o:p>&nbsp;</o:p></p>\n{quoted_html}</div>\n'
                "</body>\n</html>\n"
            )
        if client == "gmail":
            body = "".join(f"<div>{p}</div><div><br></div>" for p in paragraphs)
            quote = (f'<br><div class="gmail_quote"><blockquote class="gmail_quote" '
                     'style="margin:0px 0px 0px 0.8ex;border-left:1px solid rgb(204,204,204);'
                     f'padding-left:1ex">{quoted_html}</blockquote></div>') if quoted_html else ""
            return f'<div dir="ltr">{body}</div>{quote}\n'
        body = "".join(f"<div>{p}</div><div><br></div>" for p in paragraphs)
        quote = (f'<div><br><blockquote type="cite">{quoted_html}</blockquote></div>'
                 if quoted_html else "")
        return ('<html><head><meta http-equiv="content-type" content="text/html; charset=utf-8">'
                '</head><body style="overflow-wrap: break-word; -webkit-nbsp-mode: space; '
                f'line-break: after-white-space;">{body}{quote}</body></html>\n')

    def attachment(self, limit: int, locale: str, thread: Thread | None) -> MIMEBase:
        rng = self.rng
        size = max(2048, min(rng.randrange(10 * 1024, 60 * 1024), limit))
        kind = rng.choices(["pdf", "png", "xlsx", "log", "csv", "eml"], [30, 30, 10, 15, 10, 5])[0]
        if kind == "eml" and thread is None:
            kind = "pdf"
        if kind == "pdf":
            data = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n" + rng.randbytes(size)
            part: MIMEBase = MIMEApplication(data, "pdf")
            name = rng.choice(["invoice", "Rechnung", "facture", "report", "contract", "請求書"])
            name += f"_{rng.randrange(1000, 9999)}.pdf"
        elif kind == "png":
            part = MIMEImage(b"\x89PNG\r\n\x1a\n" + rng.randbytes(size), "png")
            name = rng.choice(["screenshot.png", "image001.png", "Bildschirmfoto 2024-03-05.png",
                               "capture d'écran.png"])
        elif kind == "xlsx":
            part = MIMEApplication(b"PK\x03\x04" + rng.randbytes(size),
                                   "vnd.openxmlformats-officedocument.spreadsheetml.sheet")
            name = f"export_{rng.randrange(100, 999)}.xlsx"
        elif kind == "log":
            text = self.log_paste(max(1, size // 95))
            part = MIMEText(text, "plain", "utf-8")
            name = rng.choice(["server.log", "sync-error.log", "debug.txt"])
        elif kind == "csv":
            rows = ["id;name;email;amount"] + [
                f"{i};{rng.choice(self.world.persons).display};{rng.choice(self.world.persons).email};"
                f"{rng.randrange(1, 99999) / 100:.2f}" for i in range(max(1, size // 60))
            ]
            part = MIMEText("\n".join(rows), "csv", "utf-8")
            name = "users.csv"
        else:
            assert thread is not None
            inner = MIMEText(self.sentences("en", 6) * max(1, size // 2000), "plain", "utf-8")
            inner["From"] = thread.person.email
            inner["To"] = SUPPORT
            inner["Subject"] = thread.subject
            inner["Date"] = self.date_header(self.clock - dt.timedelta(days=2), "en")
            inner["Message-ID"] = f"<{self.message_id(thread.person)}>"
            part = MIMEMessage(inner)
            name = ""
        if name:
            if any(ord(c) > 127 for c in name):
                part.add_header("Content-Disposition", "attachment",
                                filename=("utf-8", "", name))  # RFC 2231
                part.set_param("name", str(Header(name, "utf-8").encode()))
            else:
                part.add_header("Content-Disposition", "attachment", filename=name)
                part.set_param("name", name)
        return part

    def add_headers(self, msg: Message, person: Person, when: dt.datetime, subject: str,
                    message_id: str, to: list[str], cc: list[Person], locale: str) -> None:
        rng = self.rng
        domain = person.email.rpartition("@")[2]
        stamp = self.date_header(when + dt.timedelta(seconds=rng.randrange(1, 40)), "de")
        hops = [
            f"from mx{rng.randrange(1, 4)}.{OUR_DOMAIN} (localhost [127.0.0.1])\n\tby "
            f"imap.{OUR_DOMAIN} (Postfix) with ESMTP id {_b64ish(rng, 12)}\n\t"
            f"for <{SUPPORT}>; {stamp}",
            f"from mail-{_b64ish(rng, 6).lower()}.{domain} (mail.{domain} "
            f"[198.51.100.{rng.randrange(1, 254)}])\n\tby mx1.{OUR_DOMAIN} (Postfix) "
            "with ESMTPS id "
            f"{_b64ish(rng, 10)}\n\tfor <{SUPPORT}>; {stamp}",
        ]
        if person.client == "outlook":
            host = f"AM{rng.randrange(0, 9)}PR07MB{rng.randrange(1000, 9999)}"
            hops.append(f"from {host}.eurprd07.prod.outlook.com ([fe80::{rng.randbytes(2).hex()}])"
                        " by AM0PR07MB.eurprd07.prod.outlook.com "
                        f"([fe80::{rng.randbytes(2).hex()}%5]) with mapi id 15.20.7362.019"
                        f"; {self.date_header(when, 'de')}")
        for hop in hops:
            msg["Received"] = hop
        msg["DKIM-Signature"] = (
            f"v=1; a=rsa-sha256; c=relaxed/relaxed; d={domain}; "
            f"s=selector{rng.randrange(1, 3)};\n\tt={int(when.timestamp())}; "
            "h=From:To:Subject:Date:Message-ID:Content-Type:MIME-Version;"
            f"\n\tbh={_b64ish(rng, 43)}=;\n\tb=" + "\n\t  ".join(_b64ish(rng, 64) for _ in range(5))
        )
        charset = CHARSET_OF[locale] if rng.random() < 0.7 else "utf-8"
        msg["From"] = self.address(person.display, person.email, charset)
        msg["To"] = ", ".join(to)
        if cc:
            msg["Cc"] = ", ".join(self.address(p.display, p.email, charset) for p in cc)
        if subject.isascii():
            msg["Subject"] = subject
        else:
            msg["Subject"] = Header(subject, _fits(subject, charset))
        msg["Date"] = self.date_header(when, locale)
        msg["Message-ID"] = f"<{message_id}>"
        if person.client == "outlook":
            msg["Thread-Topic"] = Header(subject, "utf-8") if not subject.isascii() else subject
            msg["Thread-Index"] = base64.b64encode(rng.randbytes(22)).decode()
            msg["Accept-Language"] = "en-US, de-DE"
            msg["Content-Language"] = {"ja": "ja-JP", "de": "de-DE", "fr": "fr-FR",
                                       "es": "es-ES"}.get(locale, "en-US")
            msg["X-MS-Has-Attach"] = ""
            msg["X-MS-TNEF-Correlator"] = ""
            msg["X-MS-Office365-Filtering-Correlation-Id"] = (
                f"{rng.randbytes(4).hex()}-{rng.randbytes(2).hex()}-{rng.randbytes(2).hex()}-"
                f"{rng.randbytes(2).hex()}-{rng.randbytes(6).hex()}")
            if rng.random() < 0.05:
                msg["X-Priority"] = "1"
                msg["Importance"] = "high"
        elif person.client == "gmail":
            msg["X-Gm-Message-State"] = _b64ish(rng, 60)
            msg["X-Google-Smtp-Source"] = _b64ish(rng, 80)
        elif person.client == "apple":
            msg["X-Mailer"] = "Apple Mail (2.3774.400.31)"
        elif person.client == "thunderbird":
            msg["User-Agent"] = "Mozilla Thunderbird"
        else:
            msg["X-Mailer"] = rng.choice(["Becky! ver. 2.81.05", "Microsoft Outlook 16.0",
                                          "Thunderbird 115.8.1"])
        msg["Authentication-Results"] = (
            f"mx1.{OUR_DOMAIN};\n\tdkim=pass header.d={domain};\n\t"
            f"spf=pass smtp.mailfrom={domain};\n\tdmarc=pass header.from={domain}")

    @staticmethod
    def address(name: str, addr: str, charset: str) -> str:
        if name.isascii():
            return f'"{name}" <{addr}>' if "," in name else f"{name} <{addr}>"
        return f"{Header(name, _fits(name, charset)).encode()} <{addr}>"

    def assemble(self, person: Person, text: str, locale: str, quoted_html: str = "",
                 attachment_limit: int | None = None, thread: Thread | None = None
                 ) -> Message:
        """Body (plain or alternative), optionally with an attachment, in the sender's style."""
        rng = self.rng
        client = person.client
        alternative = client in ("outlook", "gmail", "apple") and rng.random() < 0.85
        charset = self.body_charset(locale)
        plain = self.text_part(text, charset)
        body: Message
        if alternative:
            body = MIMEMultipart("alternative", boundary=self.boundary(client))
            body.attach(plain)
            body.attach(self.text_part(self.html_of(text, client, quoted_html), charset, "html"))
        else:
            body = plain
        if attachment_limit is None:
            return body
        mixed = MIMEMultipart("mixed", boundary=self.boundary(client))
        mixed.attach(body)
        mixed.attach(self.attachment(attachment_limit, locale, thread))
        return mixed

    def serialize(self, msg: Message) -> bytes:
        # Real mailers put the trace and address headers first and MIME-Version once, at the top.
        for part in msg.walk():
            if part is not msg:
                del part["MIME-Version"]
        for name in ("MIME-Version", "Content-Type", "Content-Transfer-Encoding"):
            values = msg.get_all(name, [])
            del msg[name]
            for value in values[:1]:
                msg[name] = value
        out = BytesIO()
        BytesGenerator(out, mangle_from_=False, policy=compat32).flatten(msg)
        raw = out.getvalue()
        if self.rng.random() < 0.25:  # as handed over by an SMTP door
            raw = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        return raw

    def finish(self, build: Callable[[float], Message], kind: str, expect: str,
               ticket_id: int | None) -> GeneratedMail:
        """Serialise; shrink (fewer sentences, no log, smaller attachment) until within 80 KB."""
        scale = 1.0
        state = self.rng.getstate()
        for _attempt in range(8):
            self.rng.setstate(state)
            raw = self.serialize(build(scale))
            if len(raw) <= MAX_SIZE:
                break
            scale *= 0.6
        mail = GeneratedMail(raw, kind, expect, ticket_id)
        self.sent.append(mail)
        return mail

    # --- mail kinds ------------------------------------------------------------------------

    def sender(self) -> Person:
        return self.rng.choices(self.sender_order, self.sender_weights)[0]

    def colleagues(self, person: Person, count: int) -> list[Person]:
        if person.company is None:
            return []
        pool = [p for p in self.company_people.get(person.company.name, []) if p is not person]
        return self.rng.sample(pool, min(count, len(pool)))

    def body_size(self, scale: float) -> tuple[int, int]:
        """Sentences of prose and lines of a pasted log."""
        sentences = max(1, min(40, int(self.rng.lognormvariate(1.5, 0.7) * scale)))
        log_lines = int(self.rng.randrange(20, 500) * scale) if self.rng.random() < 0.08 else 0
        return sentences, log_lines

    def new_ticket(self, forced_person: Person | None = None, kind: str = "new") -> GeneratedMail:
        rng = self.rng
        person = forced_person or self.sender()
        locale = person.locale
        when = self.tick()
        subject = self.fill(rng.choice(SUBJECTS[locale]), locale)
        if kind == "orphan":
            subject = RE_PREFIX[locale] + subject
        cc = self.colleagues(person, rng.choice([1, 1, 2, 3])) if rng.random() < 0.2 else []
        to = [BILLING if rng.random() < 0.07 else SUPPORT]
        mid = self.message_id(person)
        with_attachment = rng.random() < 0.18
        ticket_id = self.next_ticket
        thread = Thread(ticket_id, subject, person, cc, locale)

        def build(scale: float) -> Message:
            sentences, log_lines = self.body_size(scale)
            text = self.sentences(locale, sentences)
            if log_lines:
                text += "\n\n" + self.log_paste(log_lines)
            body = self.body(person, text)
            limit = int(60 * 1024 * scale) if with_attachment else None
            msg = self.assemble(person, body, locale, attachment_limit=limit,
                                thread=self.threads[-1] if self.threads else None)
            self.add_headers(msg, person, when, subject, mid, [self.address("Support", a, "utf-8")
                                                               for a in to], cc, locale)
            thread.history = [(person.display, person.email, when, body)]
            return msg

        mail = self.finish(build, kind, "created", ticket_id)
        thread.customer_ids.append(mid)
        self.threads.append(thread)
        self.next_ticket += 1
        return mail

    def pick_thread(self) -> Thread:
        recent = self.threads[-80:]
        index = len(recent) - 1 - min(int(self.rng.expovariate(1 / 15)), len(recent) - 1)
        return recent[index]

    def reply(self, style: str) -> GeneratedMail:
        """style: token | customer | tag"""
        rng = self.rng
        thread = self.pick_thread()
        locale = thread.locale
        person = thread.person
        if thread.cc and rng.random() < 0.3:
            person = rng.choice(thread.cc)
        when = self.tick()
        agent = rng.choice(AGENTS[:5])
        agent_name, agent_addr = f"{agent[1]} {agent[2]}", SUPPORT
        tag = f"[#{thread.ticket_id}]"
        refs: list[str] = []
        in_reply_to: str | None = None
        if style in ("token", "tag"):  # the customer answers an agent's mail
            thread.agent_replies += 1
            agent_when = when - dt.timedelta(minutes=rng.randrange(5, 600))
            greeting = {"de": "Hallo", "fr": "Bonjour", "es": "Hola",
                        "ja": "いつもお世話になっております。"}
            agent_text = (f"{greeting.get(locale, 'Hello')} {person.first},\n\n"
                          f"{rng.choice(AGENT_TEXT)}\n\nBest regards,\n{agent_name}\nHelpdesk Team")
            thread.history.append((agent_name, agent_addr, agent_when, agent_text))
            token = _signed_message_id(thread.ticket_id, rng.randbytes(6).hex())
            in_reply_to = token
            refs = [*thread.customer_ids[-3:], token]
            subject = RE_PREFIX[locale] + f"{tag} {thread.subject}"
        else:  # a follow-up or reply-all to a customer mail
            in_reply_to = thread.customer_ids[-1]
            refs = thread.customer_ids[-4:]
            subject = RE_PREFIX[locale] + thread.subject
        if style == "tag":
            in_reply_to, refs = None, []
        mid = self.message_id(person)

        def build(scale: float) -> Message:
            text = self.fill(rng.choice(FOLLOW_UP[locale]), locale)
            sentences, log_lines = self.body_size(scale * 0.6)
            if rng.random() < 0.5:
                text += "\n\n" + self.sentences(locale, sentences)
            if log_lines:
                text += "\n\n" + self.log_paste(log_lines)
            body = self.body(person, text, greet=rng.random() < 0.6)
            quoted_plain, quoted_html = "", ""
            if rng.random() < 0.85:  # most clients quote the history
                depth = rng.randrange(1, 4)
                for name, addr, at, old in reversed(thread.history[-depth:]):
                    head = self.quote_header(locale, person.client, name, addr, at, thread.subject,
                                             SUPPORT)
                    if person.client in ("outlook",):
                        quoted_plain += "\n" + head + "\n" + old + "\n"
                    else:
                        quoted_plain += "\n" + head + "".join(f"> {line}\n" for line in
                                                              old.splitlines())
                    quoted_html += ("<div>" + html.escape(head).replace("\n", "<br>") + "</div>"
                                    + html.escape(old).replace("\n", "<br>\n"))
                quoted_plain = quoted_plain[: int(30000 * scale)]
                quoted_html = quoted_html[: int(40000 * scale)]
            limit = int(50 * 1024 * scale) if rng.random() < 0.15 else None
            msg = self.assemble(person, body + "\n" + quoted_plain, locale, quoted_html, limit,
                                thread)
            to = [self.address("Support", SUPPORT, "utf-8")]
            cc = [p for p in thread.cc if p is not person]
            if person is not thread.person:
                cc.append(thread.person)
            self.add_headers(msg, person, when, subject, mid, to, cc, locale)
            if in_reply_to:
                msg["In-Reply-To"] = f"<{in_reply_to}>"
            if refs:
                msg["References"] = "\n ".join(f"<{r}>" for r in refs)
            written[:] = [body]
            return msg

        written: list[str] = []
        mail = self.finish(build, f"reply-{style}", "appended", thread.ticket_id)
        thread.history.append((person.display, person.email, when, written[0]))
        thread.customer_ids.append(mid)
        return mail

    def untrusted_tag(self) -> GeneratedMail:
        """Someone from another company quotes a ticket tag: not trusted, opens a new ticket."""
        thread = self.pick_thread()
        own = thread.person.company
        stranger = next(p for p in self.rng.sample(self.world.persons, 20)
                        if p.company is not own and p.company is not None)
        mail = self.new_ticket(stranger, kind="untrusted-tag")
        # Put the foreign tag into the subject (the headers are otherwise those of a new ticket).
        subject = f"[#{thread.ticket_id}] "
        raw = mail.raw
        for prefix in (b"\r\nSubject: ", b"\nSubject: "):
            if prefix in raw:
                raw = raw.replace(prefix, prefix + subject.encode(), 1)
                break
        mail.raw = raw
        return mail

    def auto_reply(self, referenced: bool) -> GeneratedMail:
        rng = self.rng
        thread = self.pick_thread()
        person = thread.person
        locale = person.locale
        when = self.tick()
        subject_template, text_template = AUTO_REPLY[locale]
        tag = f"[#{thread.ticket_id}] " if referenced else ""
        subject = subject_template.format(subject=RE_PREFIX[locale] + tag + thread.subject)
        token = _signed_message_id(thread.ticket_id, rng.randbytes(6).hex())
        mid = self.message_id(person)

        def build(scale: float) -> Message:
            back = f"{rng.randrange(1, 28)}.0{rng.randrange(3, 9)}."
            text = self.fill(text_template.replace("{date}", back), locale)
            msg = self.assemble(person, text + "\n\n" + self.signature(person), locale)
            self.add_headers(msg, person, when, subject, mid, [SUPPORT], [], locale)
            msg["Auto-Submitted"] = "auto-replied"
            msg["X-Auto-Response-Suppress"] = "All"
            if person.client == "outlook":
                msg["X-MS-Exchange-Inbox-Rules-Loop"] = person.email
            if referenced:
                msg["In-Reply-To"] = f"<{token}>"
                msg["References"] = f"<{token}>"
            return msg

        if referenced:
            return self.finish(build, "auto-reply", "appended", thread.ticket_id)
        return self.finish(build, "auto-reply-unreferenced", "ignored", None)

    def bounce(self, referenced: bool) -> GeneratedMail:
        rng = self.rng
        thread = self.pick_thread()
        when = self.tick()
        recipient = (thread.cc or [thread.person])[0]
        token = _signed_message_id(thread.ticket_id, rng.randbytes(6).hex())
        original_subject = f"RE: [#{thread.ticket_id}] {thread.subject}"
        exchange = rng.random() < 0.4
        mid = f"{rng.randbytes(8).hex()}@mx1.{OUR_DOMAIN}"

        def build(scale: float) -> Message:
            boundary = f"{rng.randbytes(6).hex()}.{int(when.timestamp())}/mx1.{OUR_DOMAIN}"
            report = MIMEMultipart("report", boundary=boundary)
            report.set_param("report-type", "delivery-status")
            notice = (f"This is the mail system at host mx1.{OUR_DOMAIN}.\n\nI'm sorry to have to "
                      "inform you that your message could not\nbe delivered to one or more "
                      "recipients. It's attached below.\n\n"
                      f"<{recipient.email}>: host mail.{recipient.email.rpartition('@')[2]}"
                      "[203.0.113.25] said: 550 5.1.1\n    <"
                      f"{recipient.email}>: Recipient address rejected: User unknown\n")
            report.attach(MIMEText(notice, "plain", "us-ascii"))
            per_message, per_recipient = Message(), Message()
            per_message["Reporting-MTA"] = f"dns; mx1.{OUR_DOMAIN}"
            per_message["Arrival-Date"] = self.date_header(when, "en")
            per_recipient["Final-Recipient"] = f"rfc822; {recipient.email}"
            per_recipient["Action"] = "failed"
            per_recipient["Status"] = "5.1.1"
            per_recipient["Diagnostic-Code"] = "smtp; 550 5.1.1 User unknown"
            status = MIMEBase("message", "delivery-status")
            status.set_payload([per_message, per_recipient])
            report.attach(status)
            original = MIMEText(f"Hello {recipient.first},\n\n{rng.choice(AGENT_TEXT)}\n\n"
                                "Best regards,\nHelpdesk Team\n", "plain", "utf-8")
            original["From"] = f"Helpdesk <{SUPPORT}>"
            original["To"] = recipient.email
            original["Subject"] = original_subject
            original["Date"] = self.date_header(when - dt.timedelta(seconds=30), "en")
            original["Message-ID"] = f"<{token if referenced else self.message_id(recipient)}>"
            if referenced:
                original["In-Reply-To"] = f"<{thread.customer_ids[-1]}>"
                original["References"] = f"<{thread.customer_ids[-1]}>"
            if exchange:
                header_block = original.as_string().split("\n\n", 1)[0] + "\n"
                headers = MIMEText(header_block, "rfc822-headers", "us-ascii")
                report.attach(headers)
            else:
                report.attach(MIMEMessage(original))
            report["Return-Path"] = "<>"
            report["Received"] = f"by mx1.{OUR_DOMAIN} (Postfix)\n\tid {_b64ish(rng, 10)}; " + \
                self.date_header(when, "de")
            report["Date"] = self.date_header(when, "de")
            report["From"] = f"MAILER-DAEMON@mx1.{OUR_DOMAIN} (Mail Delivery System)"
            report["Subject"] = ("Undeliverable: " + original_subject if exchange
                                 else "Undelivered Mail Returned to Sender")
            report["To"] = SUPPORT
            report["Auto-Submitted"] = "auto-replied"
            report["Message-ID"] = f"<{mid}>"
            return report

        if referenced:
            return self.finish(build, "bounce", "appended", thread.ticket_id)
        return self.finish(build, "bounce-unreferenced", "ignored", None)

    def newsletter(self) -> GeneratedMail:
        rng = self.rng
        when = self.tick()
        vendor = rng.choice(["Cloudy SaaS", "Metrics Weekly", "DevOps Digest"])
        domain = vendor.lower().replace(" ", "") + ".example"
        mid = f"{rng.randbytes(10).hex()}@mailer.{domain}"

        def build(scale: float) -> Message:
            items = max(3, int(rng.randrange(6, 30) * scale))
            rows = "".join(
                f'<tr><td style="padding:16px 24px;font-family:Helvetica,Arial,sans-serif;'
                f'font-size:15px;line-height:22px;color:#333333"><h2 style="margin:0 0 8px 0;'
                f'font-size:20px">{html.escape(self.fill(rng.choice(SENTENCES["en"])))}</h2>'
                f"<p>{html.escape(self.sentences('en', 4))}</p><a href=\"https://click.{domain}/"
                f'{rng.randbytes(24).hex()}" style="color:#0066cc">Read more</a>'
                f'<img src="https://img.{domain}/{rng.randbytes(8).hex()}.png" width="560" '
                f'alt="" style="display:block"></td></tr>'
                for _ in range(items)
            )
            page = ('<!DOCTYPE html><html><head><meta charset="utf-8"><style>body{margin:0}'
                    "@media only screen and (max-width:600px){.container{width:100%!important}}"
                    '</style></head><body><table class="container" width="600" cellpadding="0" '
                    f'cellspacing="0" align="center">{rows}</table><img src="https://t.{domain}/o/'
                    f'{rng.randbytes(16).hex()}" width="1" height="1"></body></html>')
            msg = MIMEMultipart("alternative", boundary=self.boundary("gmail"))
            msg.attach(MIMEText(f"{vendor} newsletter. View in your browser.", "plain", "utf-8"))
            part = MIMEText(page, "html", "utf-8")
            msg.attach(part)
            msg["From"] = f"{vendor} <news@{domain}>"
            msg["To"] = SUPPORT
            msg["Subject"] = f"{vendor}: what's new in {MONTHS[when.month - 1]}"
            msg["Date"] = self.date_header(when, "en")
            msg["Message-ID"] = f"<{mid}>"
            msg["List-Unsubscribe"] = f"<https://{domain}/u/{rng.randbytes(12).hex()}>"
            msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
            msg["Precedence"] = "bulk"
            msg["Feedback-ID"] = f"{rng.randrange(1000, 9999)}:campaign:{domain}"
            return msg

        return self.finish(build, "newsletter", "ignored", None)

    def vendor_pitch(self) -> GeneratedMail:
        when = self.tick()
        person = Person("Chad", "Closer", "chad@promo.vendor.example", "en", None, False, "gmail",
                        "Account Executive")
        mid = self.message_id(person)

        def build(scale: float) -> Message:
            text = ("Hi there,\n\nI noticed your team is growing fast. Would you have 15 minutes "
                    "next week to see how our platform cuts ticket handling time by 43%?\n\n"
                    + self.sentences("en", 3) + "\n\nBest,\nChad")
            msg = self.assemble(person, text, "en")
            self.add_headers(msg, person, when, "Quick question about your support stack", mid,
                             [SUPPORT], [], "en")
            return msg

        return self.finish(build, "vendor-pitch", "ignored", None)

    def duplicate(self) -> GeneratedMail:
        """The same mail delivered again (another Received line, same Message-ID)."""
        rng = self.rng
        candidates = [m for m in self.sent[-200:]
                      if m.kind in ("new", "reply-token", "reply-customer")]
        original = rng.choice(candidates)
        peer = f"mx2.{OUR_DOMAIN} [192.0.2.{rng.randrange(2, 250)}]"
        hop = (f"Received: from mx2.{OUR_DOMAIN} ({peer})"
               f"\n\tby imap.{OUR_DOMAIN} (Postfix) with LMTP id {_b64ish(rng, 12)}; "
               f"{self.date_header(self.tick(), 'de')}\n").encode()
        if original.raw.count(b"\r\n") > original.raw.count(b"\n") // 2:
            hop = hop.replace(b"\n", b"\r\n")
        mail = GeneratedMail(hop + original.raw, "duplicate", "duplicate", original.ticket_id)
        self.sent.append(mail)
        return mail

    # --- the mix ---------------------------------------------------------------------------

    MIX = (  # kind, weight (per 1000)
        ("new", 430), ("reply-token", 190), ("reply-customer", 90), ("reply-tag", 110),
        ("orphan", 10), ("untrusted-tag", 5), ("auto-reply", 25), ("auto-reply-unreferenced", 12),
        ("bounce", 10), ("bounce-unreferenced", 5), ("newsletter", 20), ("vendor-pitch", 8),
        ("duplicate", 10),
    )

    def next_mail(self) -> GeneratedMail:
        kinds, weights = zip(*self.MIX, strict=True)
        kind = self.rng.choices(kinds, weights)[0]
        if len(self.threads) < 10 and kind not in ("newsletter", "vendor-pitch"):
            kind = "new"
        if kind == "new":
            return self.new_ticket()
        if kind == "orphan":
            return self.new_ticket(self.pick_thread().person, kind="orphan")
        if kind.startswith("reply-"):
            return self.reply(kind.removeprefix("reply-"))
        if kind == "untrusted-tag":
            return self.untrusted_tag()
        if kind.startswith("auto-reply"):
            return self.auto_reply(referenced=kind == "auto-reply")
        if kind.startswith("bounce"):
            return self.bounce(referenced=kind == "bounce")
        if kind == "newsletter":
            return self.newsletter()
        if kind == "vendor-pitch":
            return self.vendor_pitch()
        return self.duplicate()


def generate(n: int = 2000, seed: int = DEFAULT_SEED) -> list[GeneratedMail]:
    """``n`` mails with their kind and the outcome the stream expects (same seed, same bytes)."""
    stream = Stream(seed, build_world())
    return [stream.next_mail() for _ in range(n)]


def generate_mails(n: int = 2000, seed: int = DEFAULT_SEED) -> list[bytes]:
    return [mail.raw for mail in generate(n, seed)]


def describe(mails: list[GeneratedMail]) -> dict[str, object]:
    """Counts and size percentiles, to check the mix looks like real traffic."""
    sizes = sorted(len(m.raw) for m in mails)

    def pct(p: float) -> int:
        return sizes[min(len(sizes) - 1, math.floor(p * len(sizes)))]

    charsets: Counter[str] = Counter()
    shapes: Counter[str] = Counter()
    for mail in mails:
        head = mail.raw[:200000].lower()
        for name in (b"utf-8", b"iso-8859-1", b"iso-2022-jp"):
            if b"charset=\"" + name in head or b"charset=" + name in head:
                charsets[name.decode()] += 1
        shapes["alternative"] += b"multipart/alternative" in head
        shapes["attachment"] += b"content-disposition: attachment" in head or (
            b"message/rfc822" in head and mail.kind != "bounce")
        shapes["quoted-printable"] += b"quoted-printable" in head
        shapes["crlf"] += b"\r\n" in mail.raw[:2000]
    senders = set()
    for mail in mails:
        from_line = mail.raw.split(b"\nFrom: ", 1)[-1].split(b"\n", 1)[0]
        senders.add(from_line.rpartition(b"<")[2].strip(b"\r> ").lower())
    return {
        "mails": len(mails),
        "bytes": sum(sizes),
        "size_p50": pct(0.5), "size_p90": pct(0.9), "size_min": sizes[0], "size_max": sizes[-1],
        "size_mean": int(statistics.mean(sizes)),
        "kinds": dict(Counter(m.kind for m in mails).most_common()),
        "expected": dict(Counter(m.expect for m in mails).most_common()),
        "charsets (mails mentioning)": dict(charsets),
        "shapes": dict(shapes),
        "distinct senders": len(senders),
        "sha256": hashlib.sha256(b"".join(m.raw for m in mails)).hexdigest(),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--out", type=Path, help="write NNNN-kind.eml files here")
    parser.add_argument("--stats", action="store_true", help="print what the stream contains")
    parser.add_argument("--write-config", action="store_true", help=f"rewrite {CONFIG_PATH}")
    args = parser.parse_args(argv)
    if args.write_config:
        CONFIG_PATH.write_text(render_config(), encoding="utf-8")
        print(f"wrote {CONFIG_PATH}")
    if args.out or args.stats:
        mails = generate(args.n, args.seed)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            for index, mail in enumerate(mails, start=1):
                (args.out / f"{index:04d}-{mail.kind}.eml").write_bytes(mail.raw)
            print(f"wrote {len(mails)} mails to {args.out}")
        if args.stats:
            for key, value in describe(mails).items():
                print(f"{key:>28}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
