"""Sender authentication: SPF (RFC 7208), DKIM (RFC 6376) and DMARC (RFC 7489).

None of the anchor help desks checks who really sent a mail, so a forged From of a known
customer is attributed to that customer, and a forged ``[#123]`` threads onto their ticket.  This
module gives the pipeline a verdict on the From domain, from one of two kinds of evidence:

* **our own checks**, for mail ticketgate's SMTP listener took straight from the internet: SPF on
  the client IP, HELO and MAIL FROM (pyspf); every DKIM signature up to a limit (dkimpy); then
  DMARC on the RFC 5322 From domain, evaluated here: policy discovery at ``_dmarc.<domain>`` and
  then at the organizational domain (the public suffix list that ships with the
  ``publicsuffixlist`` package: no download at run time), relaxed or strict identifier alignment
  (``aspf``/``adkim``), ``p``/``sp`` and ``pct``;
* **an upstream MTA's word**, for mail that reached ticketgate through another MTA (IMAP, the
  HTTP API, ``replay``, SMTP from a trusted relay): the topmost ``Authentication-Results`` header
  (RFC 8601) whose authserv-id is configured as trusted.  A header with any other authserv-id is
  ignored: anyone can write one.

The verdict is ``pass`` when DMARC passes, or when the domain publishes no DMARC record but SPF
or DKIM passes for an aligned domain; ``fail`` or ``temperror`` otherwise; ``none`` when there
was no evidence at all.  All DNS goes through one dnspython resolver built from
``[authentication]`` (name servers, port, timeout), so tests and air-gapped sites can point it
at their own server.
"""

from __future__ import annotations

import contextvars
import hashlib
import ipaddress
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from email.message import Message
from email.utils import getaddresses
from functools import lru_cache
from typing import Any, Literal

import dkim
import dkim.util
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
import spf
from publicsuffixlist import PublicSuffixList

from ingest.config import AuthenticationSection

Verdict = Literal["pass", "fail", "temperror", "none"]
POLICIES = ("none", "quarantine", "reject")
MAX_AR_HEADERS = 50  # Authentication-Results fields looked at, top first
MAX_SPF_SECONDS = 20.0  # all SPF lookups of one mail together (pyspf's querytime)


class DnsTempError(Exception):
    """The resolver could not answer (timeout, SERVFAIL, no server): a temporary error."""


# --- DNS -------------------------------------------------------------------------------------


class Lookup:
    """Every DNS query of this module, through one configurable dnspython resolver."""

    def __init__(self, nameservers: tuple[str, ...] = (), port: int = 53, timeout: float = 5.0,
                 disabled: str | None = None):
        self.error: str | None = disabled  # set: every query is a temporary error
        if disabled:
            nameservers = nameservers or ("127.0.0.1",)  # never asked
        try:
            resolver = dns.resolver.Resolver(configure=not nameservers)
        except dns.exception.DNSException as exc:  # no /etc/resolv.conf: every lookup fails
            resolver = dns.resolver.Resolver(configure=False)
            self.error = f"no resolver configuration: {exc}"
        if nameservers:
            resolver.nameservers = list(nameservers)
            resolver.port = port
        resolver.timeout = timeout  # per try
        resolver.lifetime = timeout  # all tries of one query
        resolver.cache = dns.resolver.LRUCache(4096)
        self.resolver = resolver
        self.timeout = timeout

    def query(self, name: str, rdtype: str) -> list[Any]:
        """The records of ``rdtype`` at ``name``; [] for NXDOMAIN, NODATA or an invalid name."""
        if self.error:
            raise DnsTempError(self.error)
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException:
            return []
        try:
            answer = self.resolver.resolve(qname, rdtype, search=False,
                                           raise_on_no_answer=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
            raise DnsTempError(f"{rdtype} {name}: {type(exc).__name__}") from exc
        except dns.exception.DNSException as exc:
            raise DnsTempError(f"{rdtype} {name}: {exc}") from exc
        return list(answer.rrset) if answer.rrset is not None else []

    def txt(self, name: str) -> list[bytes]:
        """TXT records, each one's strings joined (RFC 7208 3.3, RFC 6376 3.6.2.2)."""
        return [b"".join(r.strings) for r in self.query(name, "TXT")]


@lru_cache(maxsize=16)
def _lookup(nameservers: tuple[str, ...], port: int, timeout: float) -> Lookup:
    return Lookup(nameservers, port, timeout)


def lookup_for(section: AuthenticationSection) -> Lookup:
    return _lookup(tuple(section.nameservers), section.dns_port, section.dns_timeout)


# pyspf resolves through a module-level function; route it through the Lookup of the check in
# progress (a context variable, so concurrent checks in threads keep their own resolver).
_SPF_LOOKUP: contextvars.ContextVar[Lookup | None] = contextvars.ContextVar(
    "ticketgate_spf_lookup", default=None
)
_PYSPF_LOOKUP = spf.DNSLookup


def _pyspf_dns(name: str, qtype: str, strict: Any = True, timeout: float = 30) -> list[Any]:
    lookup = _SPF_LOOKUP.get()
    if lookup is None:
        return list(_PYSPF_LOOKUP(name, qtype, strict, timeout))
    try:
        records = lookup.query(name, qtype)
    except DnsTempError as exc:
        raise spf.TempError(f"DNS {exc}") from exc
    found: list[Any] = []
    for rdata in records:
        if qtype in ("A", "AAAA"):
            found.append(((name, qtype), rdata.address))
        elif qtype == "MX":
            found.append(((name, qtype), (rdata.preference, rdata.exchange)))
        elif qtype == "PTR":
            found.append(((name, qtype), rdata.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            found.append(((name, qtype), rdata.strings))
    return found


spf.DNSLookup = _pyspf_dns


@contextmanager
def _spf_resolver(lookup: Lookup) -> Iterator[None]:
    token = _SPF_LOOKUP.set(lookup)
    try:
        yield
    finally:
        _SPF_LOOKUP.reset(token)


# --- results ---------------------------------------------------------------------------------


@dataclass(slots=True)
class MethodResult:
    """One SPF, DKIM or DMARC result, in RFC 8601 words (pass, fail, softfail, none, ...)."""

    result: str
    domain: str | None = None  # spf: MAIL FROM (or HELO) domain; dkim: d=; dmarc: From domain
    aligned: bool | None = None  # with the From domain, under the DMARC record's mode
    detail: str = ""


@dataclass(slots=True)
class SenderAuthentication:
    """What is known about the From domain of one mail; stored on the message and the trace."""

    source: Literal["smtp", "authentication-results", "none"] = "none"
    from_domain: str | None = None
    spf: MethodResult | None = None
    dkim: list[MethodResult] = field(default_factory=list)
    dmarc: MethodResult | None = None
    policy: str | None = None  # the DMARC policy in force for the From domain, after pct
    authserv_id: str | None = None
    verdict: Verdict = "none"
    reason: str = "no evidence"

    @property
    def evaluated(self) -> bool:
        return self.source != "none"

    def summary(self) -> str:
        parts = []
        if self.spf is not None:
            parts.append(f"spf={self.spf.result}" + (f" ({self.spf.domain})"
                                                     if self.spf.domain else ""))
        if self.dkim:
            parts.append("dkim=" + ",".join(
                f"{d.result}" + (f" ({d.domain})" if d.domain else "") for d in self.dkim))
        elif self.evaluated:
            parts.append("dkim=none")
        if self.dmarc is not None:
            parts.append(f"dmarc={self.dmarc.result}"
                         + (f" p={self.policy}" if self.policy else ""))
        return " ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- domains ---------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _psl() -> PublicSuffixList:
    return PublicSuffixList()  # the snapshot bundled with the package; no network


@lru_cache(maxsize=4096)
def organizational_domain(domain: str) -> str:
    """RFC 7489 3.2: the public suffix plus one label (``mail.example.co.uk`` -> example.co.uk)."""
    domain = domain.lower().rstrip(".")
    return _psl().privatesuffix(domain) or domain


def aligned(domain: str | None, from_domain: str, mode: str) -> bool:
    if not domain:
        return False
    domain = domain.lower().rstrip(".")
    if mode == "s":
        return domain == from_domain
    return organizational_domain(domain) == organizational_domain(from_domain)


_DOMAIN_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,62}"
                        r"[a-z0-9])?)+$")


def _domain_of(address: str) -> str | None:
    domain = address.strip().strip("<>").rpartition("@")[2].strip().lower().rstrip(".")
    if not domain:
        return None
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        return None
    return domain if _DOMAIN_RE.match(domain) else None


def from_domain(message: Message) -> tuple[str | None, str]:
    """The RFC 5322 From domain DMARC judges, or None and why it cannot be judged.

    RFC 7489 6.6.1: a message with several From fields, or one field naming several addresses,
    has no single author domain; it is not given the benefit of the doubt.
    """
    fields = message.get_all("From", [])
    if len(fields) != 1:
        return None, f"{len(fields)} From fields"
    addresses = [a for _n, a in getaddresses([str(fields[0])]) if a]
    if len(addresses) != 1:
        return None, f"{len(addresses)} addresses in From"
    domain = _domain_of(addresses[0])
    if domain is None:
        return None, f"no valid domain in From {addresses[0][:80]!r}"
    return domain, ""


# --- SPF, DKIM -------------------------------------------------------------------------------


def check_spf(lookup: Lookup, client_ip: str, mail_from: str | None, helo: str | None
              ) -> MethodResult:
    """RFC 7208 check_host on MAIL FROM, or on the HELO name for the null sender (bounces)."""
    try:
        ipaddress.ip_address(client_ip)
    except ValueError:
        return MethodResult("none", None, detail=f"no usable client IP {client_ip[:60]!r}")
    helo = (helo or "").strip()
    sender = (mail_from or "").strip().strip("<>")
    domain = _domain_of(sender) if sender else _domain_of("@" + helo)
    if domain is None:
        return MethodResult("none", None, detail="no domain in MAIL FROM or HELO")
    with _spf_resolver(lookup):
        try:
            result, explanation = spf.check2(
                i=client_ip, s=sender or f"postmaster@{helo}", h=helo or domain,
                timeout=lookup.timeout, querytime=MAX_SPF_SECONDS,
            )
        except Exception as exc:  # pyspf raises on some malformed input; count it as permerror
            result, explanation = "permerror", f"{type(exc).__name__}: {exc}"
    return MethodResult(str(result), domain, detail=str(explanation)[:300])


def check_dkim(lookup: Lookup, raw: bytes, limit: int) -> list[MethodResult]:
    """Verify the topmost ``limit`` DKIM-Signature fields; one result each."""
    def dnsfunc(name: bytes | str, timeout: float = 5) -> bytes | None:
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        try:
            records = lookup.txt(text)
        except DnsTempError as exc:
            raise dkim.DnsTimeoutError(str(exc)) from exc
        return records[0] if records else None

    try:
        verifier = dkim.DKIM(raw, timeout=lookup.timeout)
    except Exception as exc:
        return [MethodResult("permerror", None, detail=f"message unreadable: {exc}"[:300])]
    signatures = [v for k, v in verifier.headers if k.lower() == b"dkim-signature"]
    results = []
    for index, value in enumerate(signatures[:limit]):
        domain = None
        try:
            tags = dkim.util.parse_tag_value(value)
            domain = tags.get(b"d", b"").decode("ascii", "replace").strip().lower() or None
        except Exception:
            tags = {}
        try:
            ok = verifier.verify(idx=index, dnsfunc=dnsfunc)
            result, detail = ("pass", "") if ok else ("fail", "signature did not verify")
        except dkim.DnsTimeoutError as exc:
            result, detail = "temperror", str(exc)
        except dkim.ValidationError as exc:  # RFC 8601 2.7.1: a signature that does not verify
            result = "fail" if "body hash mismatch" in str(exc) else "permerror"
            detail = str(exc)
        except Exception as exc:  # DKIMException and whatever a hostile signature provokes
            result, detail = "permerror", f"{type(exc).__name__}: {exc}"
        if result == "pass" and b"l" in tags:
            detail = "l= body length limit: content after it is not covered"
        results.append(MethodResult(result, domain, detail=detail[:300]))
    return results


# --- DMARC -----------------------------------------------------------------------------------


@dataclass(slots=True)
class DmarcRecord:
    domain: str  # where it was found: the From domain or its organizational domain
    p: str
    sp: str | None
    adkim: str
    aspf: str
    pct: int


def parse_dmarc(text: bytes) -> DmarcRecord | None:
    """Tags of one DMARC TXT record; None when it is not a usable record (RFC 7489 6.3)."""
    try:
        value = text.decode("ascii")
    except UnicodeDecodeError:
        return None
    tags: dict[str, str] = {}
    for index, part in enumerate(value.split(";")):
        key, sep, val = part.partition("=")
        key, val = key.strip().lower(), val.strip()
        if not sep:
            if index == 0:
                return None
            continue  # a stray word after v=DMARC1 is ignored, as most receivers do
        if index == 0 and (key != "v" or val != "DMARC1"):
            return None
        tags.setdefault(key, val)
    p = tags.get("p", "").lower()
    if p not in POLICIES:
        if "rua" not in tags:  # 6.6.3: a record without a valid p is ignored ...
            return None
        p = "none"  # ... unless it asks for reports: then p=none
    sp = tags.get("sp", "").lower() or None
    if sp not in (None, *POLICIES):
        sp = None
    try:
        pct = min(100, max(0, int(tags.get("pct", "100"))))
    except ValueError:
        pct = 100
    adkim = "s" if tags.get("adkim", "r").lower() == "s" else "r"
    aspf = "s" if tags.get("aspf", "r").lower() == "s" else "r"
    return DmarcRecord("", p, sp, adkim, aspf, pct)


def discover_policy(lookup: Lookup, domain: str) -> DmarcRecord | None:
    """RFC 7489 6.6.3: ``_dmarc.<From domain>``, else ``_dmarc.<organizational domain>``.

    Several records at one name, or none, mean no policy there.  Raises :class:`DnsTempError`.
    """
    org = organizational_domain(domain)
    for where in dict.fromkeys((domain, org)):
        records = [r for r in lookup.txt(f"_dmarc.{where}")
                   if r[:8].lower() == b"v=dmarc1"]
        if len(records) == 1 and (record := parse_dmarc(records[0])) is not None:
            record.domain = where
            return record
    return None


def _effective_policy(record: DmarcRecord, domain: str, sample_key: str) -> str:
    policy = record.p
    if record.domain != domain and record.sp:
        policy = record.sp  # found at the organizational domain: sp= speaks for subdomains
    if record.pct < 100 and policy != "none":
        # 6.6.4: the policy applies to pct% of failing mail, the next weaker one to the rest.
        # The sample is drawn from the mail itself so that a replay decides the same way.
        bucket = int(hashlib.sha256(sample_key.encode()).hexdigest()[:8], 16) % 100
        if bucket >= record.pct:
            policy = "quarantine" if policy == "reject" else "none"
    return policy


def evaluate_dmarc(lookup: Lookup, auth: SenderAuthentication, sample_key: str) -> None:
    """Fill ``auth.dmarc``, ``auth.policy`` and the verdict from its SPF and DKIM results."""
    domain = auth.from_domain
    if domain is None:
        auth.dmarc = MethodResult("permerror", None, detail=auth.reason)
        auth.verdict, auth.reason = "fail", f"From cannot be authenticated: {auth.reason}"
        return
    record: DmarcRecord | None = None
    dns_error = None
    try:
        record = discover_policy(lookup, domain)
    except DnsTempError as exc:
        dns_error = str(exc)
    aspf = record.aspf if record else "r"
    adkim = record.adkim if record else "r"
    if auth.spf is not None:
        auth.spf.aligned = aligned(auth.spf.domain, domain, aspf)
    for result in auth.dkim:
        result.aligned = aligned(result.domain, domain, adkim)
    passing = [m for m in ([auth.spf] if auth.spf else []) + auth.dkim
               if m.result == "pass" and m.aligned]
    if record is not None:
        auth.policy = _effective_policy(record, domain, sample_key)
    if passing:
        auth.dmarc = MethodResult("pass" if record else "none", domain,
                                  detail="" if record else "no DMARC record")
        auth.verdict = "pass"
        auth.reason = f"{domain} authenticated by aligned " + (
            "SPF" if passing[0] is auth.spf else "DKIM")
    elif dns_error is not None:
        auth.dmarc = MethodResult("temperror", domain, detail=dns_error[:300])
        auth.verdict, auth.reason = "temperror", f"DMARC lookup for {domain} failed: {dns_error}"
    elif record is None:
        auth.dmarc = MethodResult("none", domain, detail="no DMARC record")
        auth.verdict = "fail"
        auth.reason = f"{domain} has no DMARC record and no aligned SPF or DKIM pass"
    else:
        auth.dmarc = MethodResult("fail", domain)
        auth.verdict = "fail"
        auth.reason = f"DMARC fail for {domain} (no aligned SPF or DKIM pass)"


def authenticate_smtp(lookup: Lookup, raw: bytes, message: Message, client_ip: str,
                      helo: str | None, mail_from: str | None, max_dkim: int
                      ) -> SenderAuthentication:
    """Our own SPF, DKIM and DMARC checks for a mail our SMTP listener received."""
    domain, why = from_domain(message)
    auth = SenderAuthentication(source="smtp", from_domain=domain, reason=why)
    auth.spf = check_spf(lookup, client_ip, mail_from, helo)
    auth.dkim = check_dkim(lookup, raw, max_dkim)
    evaluate_dmarc(lookup, auth, hashlib.sha256(raw).hexdigest())
    return auth


# --- Authentication-Results (RFC 8601) -------------------------------------------------------


@dataclass(slots=True)
class ResInfo:
    method: str
    result: str
    properties: dict[str, str] = field(default_factory=dict)  # "smtp.mailfrom" -> value
    comment: str = ""


@dataclass(slots=True)
class AuthResultsHeader:
    authserv_id: str
    results: list[ResInfo]


def _split_comments(text: str) -> tuple[list[str], list[str]]:
    """Split at ``;`` outside comments and quoted strings; comments go to their own list."""
    segments: list[str] = []
    comments: list[str] = []
    current: list[str] = []
    comment: list[str] = []
    depth = 0
    quoted = False
    escaped = False
    for char in text:
        if escaped:
            (comment if depth else current).append(char)
            escaped = False
            continue
        if char == "\\" and (quoted or depth):
            escaped = True
            continue
        if depth:
            if char == "(":
                depth += 1
            elif char == ")":
                depth -= 1
                if depth == 0:
                    comments.append(f"{len(segments)}:" + "".join(comment))
                    comment = []
                    current.append(" ")
                    continue
            comment.append(char)
            continue
        if quoted:
            current.append(char)
            if char == '"':
                quoted = False
            continue
        if char == "(":
            depth = 1
        elif char == '"':
            quoted = True
            current.append(char)
        elif char == ";":
            segments.append("".join(current))
            current = []
        else:
            current.append(char)
    segments.append("".join(current))
    return segments, comments


_PAIR_RE = re.compile(r'([^\s=]+)\s*=\s*((?:"(?:[^"\\]|\\.)*"|[^\s"])+)')


def _unquote(value: str) -> str:
    return re.sub(r'\\(.)', r"\1", value.replace('"', ""))


def parse_authentication_results(value: str) -> AuthResultsHeader | None:
    """One Authentication-Results field value; None when it has no authserv-id."""
    text = " ".join(re.sub(r"[\x00-\x1f\x7f]", " ", str(value)).split())[:20_000]
    segments, comments = _split_comments(text)
    head = segments[0].split()
    if not head:
        return None
    authserv_id = head[0].strip().lower()
    by_segment: dict[int, list[str]] = {}
    for entry in comments:
        index, _, body = entry.partition(":")
        by_segment.setdefault(int(index), []).append(body)
    results = []
    for index, segment in enumerate(segments[1:], start=1):
        pairs = _PAIR_RE.findall(segment)
        if not pairs:
            continue  # "none", or junk
        method, result = pairs[0]
        info = ResInfo(method.split("/", 1)[0].lower(), _unquote(result).lower(),
                       comment=" ".join(by_segment.get(index, [])))
        for key, val in pairs[1:]:
            info.properties.setdefault(key.lower(), _unquote(val))
        results.append(info)
    return AuthResultsHeader(authserv_id, results)


def trusted_results(message: Message, trusted: list[str]) -> AuthResultsHeader | None:
    """The topmost Authentication-Results field whose authserv-id is trusted.

    The topmost is the one our own MTA added last; RFC 8601 5 obliges it to remove or rename
    fields that claim its authserv-id from further out, so a forged one cannot stand above it.
    """
    if not trusted:
        return None
    wanted = {t.lower() for t in trusted}
    for value in message.get_all("Authentication-Results", [])[:MAX_AR_HEADERS]:
        header = parse_authentication_results(str(value))
        if header is not None and header.authserv_id in wanted:
            return header
    return None


_POLICY_COMMENT = re.compile(r"\b(p|sp)\s*=\s*(none|quarantine|reject)\b", re.I)


def _policy_from_resinfo(info: ResInfo, domain: str) -> str | None:
    """The domain's policy as the MTA reported it: ``policy.dmarc`` (RFC 7489 11.2) or the
    ``(p=REJECT sp=...)`` comment OpenDMARC, Gmail and Microsoft write."""
    prop = info.properties.get("policy.dmarc", "").lower()
    if prop in POLICIES:
        return prop
    found = {k.lower(): v.lower() for k, v in _POLICY_COMMENT.findall(info.comment)}
    if "sp" in found and organizational_domain(domain) != domain:
        return found["sp"]
    return found.get("p")


def authenticate_from_header(lookup: Lookup | None, message: Message,
                             header: AuthResultsHeader, sample_key: str) -> SenderAuthentication:
    """A verdict from a trusted MTA's Authentication-Results."""
    domain, why = from_domain(message)
    auth = SenderAuthentication(source="authentication-results", from_domain=domain,
                                authserv_id=header.authserv_id, reason=why)
    dmarc_info = None
    for info in header.results:
        if info.method == "spf" and auth.spf is None:
            spf_domain = _domain_of(info.properties.get("smtp.mailfrom", "")) or _domain_of(
                "@" + info.properties.get("smtp.helo", ""))
            auth.spf = MethodResult(info.result, spf_domain, detail=info.comment[:300])
        elif info.method == "dkim":
            dkim_domain = info.properties.get("header.d") or info.properties.get(
                "header.i", "").rpartition("@")[2]
            auth.dkim.append(MethodResult(info.result, (dkim_domain or "").lower() or None,
                                          detail=info.comment[:300]))
        elif info.method == "dmarc" and dmarc_info is None:
            dmarc_info = info
    header_from = (dmarc_info.properties.get("header.from", "").lower().rstrip(".")
                   if dmarc_info else "")
    if dmarc_info is None or domain is None or (header_from and header_from != domain):
        # No DMARC verdict for this From: judge alignment ourselves from SPF and DKIM.
        evaluate_dmarc(lookup or Lookup(disabled="DNS not configured"), auth, sample_key)
        return auth
    result = dmarc_info.result
    auth.dmarc = MethodResult(result, domain, detail=dmarc_info.comment[:300])
    for item in ([auth.spf] if auth.spf else []) + auth.dkim:
        item.aligned = aligned(item.domain, domain, "r")
    if result == "pass":
        auth.verdict, auth.reason = "pass", f"{domain}: dmarc=pass from {header.authserv_id}"
        return auth
    auth.verdict = "temperror" if result == "temperror" else "fail"
    auth.reason = f"{domain}: dmarc={result} from {header.authserv_id}"
    if result == "fail":
        auth.policy = _policy_from_resinfo(dmarc_info, domain)
        if auth.policy is None and lookup is not None:
            try:
                record = discover_policy(lookup, domain)
            except DnsTempError:
                record = None
            if record is not None:
                auth.policy = _effective_policy(record, domain, sample_key)
    return auth


def in_networks(ip: str | None, networks: list[str]) -> bool:
    if not ip:
        return False
    try:
        address = ipaddress.ip_address(ip.strip("[]"))
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(n, strict=False) for n in networks)
