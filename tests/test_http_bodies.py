"""Response body masking for the HTTP/Kubernetes proxy (lictor_addons.http._bodies)."""

import base64
import json
from collections import Counter

import pytest
from lictor.masking import MaskPlan
from lictor_addons.http import _bodies as bodies

PLAN = MaskPlan.compile([{"detectors": ["email", "card"]}], key=b"k" * 32)
EMAIL = b"jane.doe@example.com"
CARD = b"4111 1111 1111 1111"


def masking(plan: MaskPlan = PLAN, *, kubernetes: bool = False, secrets: bool = False) -> bodies.Masking:
    return bodies.Masking(plan, kubernetes=kubernetes, secrets=secrets, secrets_response=secrets)


def run(fn: bodies.StreamFn, chunks: list[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for chunk in [*chunks, b""]:
        produced = fn(chunk)
        assert isinstance(produced, list)
        assert all(c != b"" for c in produced), "an empty chunk would end a chunked body early"
        out.extend(produced)
    return out


def errors() -> tuple[list[Exception], object]:
    seen: list[Exception] = []
    return seen, seen.append


def test_byte_stream_masks_matches_split_across_chunks() -> None:
    text = b"contact " + EMAIL + b" card " + CARD + b" end\n"
    for cut in range(1, len(text)):
        seen, on_error = errors()
        m = masking()
        out = b"".join(run(bodies.byte_stream(m, bodies.Tap(), on_error), [text[:cut], text[cut:]]))  # type: ignore[arg-type]
        assert EMAIL not in out and b"1111 1111" not in out, cut
        assert out.startswith(b"contact ") and out.endswith(b" end\n")
        assert not seen
    assert m.counts["email"] == 1 and m.counts["card"] == 1


def test_byte_stream_of_many_small_chunks_equals_whole_masking() -> None:
    text = (b"line " + EMAIL + b"\n") * 200
    seen, on_error = errors()
    tap = bodies.Tap(limit=100)
    out = b"".join(run(bodies.byte_stream(masking(), tap, on_error), [text[i : i + 7] for i in range(0, len(text), 7)]))  # type: ignore[arg-type]
    assert out == PLAN.mask_bytes(text)[0]
    assert tap.size_in == len(text) and tap.size_out == len(out) and len(tap.head) == 100


def test_markup_is_masked_as_its_character_references_read() -> None:
    page = b"<p>jane.doe&#64;example.com</p><p>4111&#x20;1111&#32;1111&#32;1111</p><p>a &amp; &lt;b&gt; &#34;</p>\n"
    m = masking()
    m.markup = True
    assert m.mask_bytes(page) == (
        b"<p>[REDACTED:email]</p><p>[REDACTED:card]</p><p>a &amp; &lt;b&gt; &#34;</p>\n"  # markup kept as written
    )
    # a line too long to hold back cannot be read reference by reference: not relayed
    seen, on_error = errors()
    long_line = [b"x" * (bodies.ESCAPED_LINE_LIMIT + 10), b" jane.doe&#64;example.com\n"]
    run(bodies.byte_stream(m, bodies.Tap(), on_error), long_line)  # type: ignore[arg-type]
    assert len(seen) == 1 and "character references" in str(seen[0])


def test_markup_no_break_spaces_between_digit_groups_are_read_as_spaces() -> None:
    m = masking()
    m.markup = True
    refs = ["&nbsp;", "&#160;", "&#xA0;", "&#x202f;", "&#8199;", "&nbsp"]
    for ref in refs:
        page = b"<p>" + CARD.replace(b" ", ref.encode()) + b"</p>"
        assert m.mask_bytes(page) == b"<p>[REDACTED:card]</p>", ref
    # elsewhere a no-break space stays as written, and a number that fails Luhn is not masked
    page = b"<p>a&nbsp;b&nbsp;1</p><p>4111&nbsp;1111&nbsp;1111&nbsp;1112</p>"
    assert m.mask_bytes(page) == b"<p>a&nbsp;b&nbsp;1</p><p>4111 1111 1111 1112</p>"


def test_passthrough_never_emits_empty_chunks() -> None:
    seen, on_error = errors()
    out = run(bodies.passthrough(bodies.Tap(), on_error), [b"a", b"b"])  # type: ignore[arg-type]
    assert out == [b"a", b"b"]


def test_document_stream_masks_whole_json_and_enforces_its_limit() -> None:
    doc = json.dumps({"users": [{"email": EMAIL.decode(), "card": CARD.decode()}] * 3}).encode()
    seen, on_error = errors()
    out = b"".join(run(bodies.document_stream(masking(), 1 << 20, bodies.Tap(), on_error), [doc[:10], doc[10:]]))  # type: ignore[arg-type]
    parsed = json.loads(out)
    assert all(u["email"] == "[REDACTED:email]" and u["card"] == "[REDACTED:card]" for u in parsed["users"])
    seen, on_error = errors()
    out = b"".join(run(bodies.document_stream(masking(), 50, bodies.Tap(), on_error), [doc[:40], doc[40:]]))  # type: ignore[arg-type]
    assert out == b"" and len(seen) == 1 and isinstance(seen[0], bodies.BodyError)
    # A document that must be masked by JSON path but is not JSON is not relayed at all...
    paths = MaskPlan.compile([{"json_paths": ["$.email"]}], key=b"k" * 32)
    seen, on_error = errors()
    out = b"".join(run(bodies.document_stream(masking(paths), 1 << 20, bodies.Tap(), on_error), [b"{not json"]))  # type: ignore[arg-type]
    assert out == b"" and len(seen) == 1
    # ...while detectors alone mask it as text.
    seen, on_error = errors()
    broken = b'{"email": "' + EMAIL + b'", oops'
    out = b"".join(run(bodies.document_stream(masking(), 1 << 20, bodies.Tap(), on_error), [broken]))  # type: ignore[arg-type]
    assert EMAIL not in out and not seen


def test_detector_only_json_is_masked_as_parsed_not_as_text() -> None:
    """Escaped values, numbers and secret keys with a list or object value: the body stays JSON and what
    mask_json masks in the parsed document is masked in the body."""
    plan = MaskPlan.compile([{"detectors": ["card", "email", "secret_assignment"]}], key=b"k" * 32)
    config = json.dumps({"db": {"password": "hunter2"}, "url": "postgres://app:s3cret@db:5432/app"})
    docs = [
        {"kind": "ConfigMap", "data": {"config.json": config}},  # JSON inside a string: its quotes are escaped
        {"card": 4111111111111111, "id": 7},
        {"password": ["hunter2", "hunter3"], "api_key": {"live": "sk-hunter4"}, "credentials": 12345678},
    ]
    for doc in docs:
        for raw in (json.dumps(doc).encode(), json.dumps(doc).replace("/", "\\/").encode()):  # PHP escapes /
            out = masking(plan).mask_json_bytes(raw)
            assert json.loads(out) == plan.mask_json(doc)[0], raw
            for value in (b"hunter", b"s3cret", b"4111111111111111", b"12345678"):
                assert value not in out
    clean = b'{"id": 7, "note": "nothing to mask"}'
    assert masking(plan).mask_json_bytes(clean) is clean  # relayed as it came


def secret(name: str, **data: str) -> dict:  # type: ignore[type-arg]
    encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    last = json.dumps({"apiVersion": "v1", "kind": "Secret", "data": encoded, "metadata": {"name": name}})
    return {
        "metadata": {"name": name, "annotations": {bodies.LAST_APPLIED: last}},
        "data": encoded,
        "stringData": {"plain": "hunter2"},
        "type": "Opaque",
    }


def test_secrets_are_masked_in_objects_lists_and_annotations() -> None:
    item = secret("db", password="s3cr3t-value")
    lst = {"kind": "SecretList", "apiVersion": "v1", "items": [item]}  # list items carry no kind
    counts: Counter[str] = Counter()
    bodies.mask_secrets(lst, counts, secrets_response=True)
    text = json.dumps(lst)
    assert "s3cr3t" not in text and base64.b64encode(b"s3cr3t-value").decode() not in text and "hunter2" not in text
    masked = lst["items"][0]
    assert base64.b64decode(masked["data"]["password"]) == bodies.REDACTED.encode()  # still valid base64
    assert json.loads(masked["metadata"]["annotations"][bodies.LAST_APPLIED])["data"]["password"] == bodies.REDACTED_B64
    # Outside a secrets response only objects that say they are Secrets are touched.
    configmap = {"kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"k": "v"}}
    bodies.mask_secrets(configmap, counts, secrets_response=False)
    assert configmap["data"] == {"k": "v"}
    table = {"kind": "Table", "rows": [{"object": {"kind": "Secret", "metadata": {}, "data": {"a": "eA=="}}}]}
    bodies.mask_secrets(table, counts, secrets_response=False)
    assert table["rows"][0]["object"]["data"]["a"] == bodies.REDACTED_B64


def test_applied_secrets_are_masked_in_metadata_only_objects() -> None:
    last = secret("db", password="s3cr3t-value")["metadata"]["annotations"][bodies.LAST_APPLIED]
    meta = {"kind": "PartialObjectMetadata", "metadata": {"name": "db", "annotations": {bodies.LAST_APPLIED: last}}}
    for secrets_response in (True, False):  # a Table of secrets; anywhere, one that says it is a Secret's
        table = {"kind": "Table", "rows": [{"cells": ["db"], "object": json.loads(json.dumps(meta))}]}
        bodies.mask_secrets(table, Counter(), secrets_response=secrets_response)
        masked = table["rows"][0]["object"]["metadata"]["annotations"][bodies.LAST_APPLIED]
        assert "s3cr3t" not in masked and json.loads(masked)["data"]["password"] == bodies.REDACTED_B64
    configmap = {"kind": "ConfigMap", "apiVersion": "v1", "metadata": {"name": "c"}, "data": {"k": "v"}}
    applied = {**configmap, "metadata": {"name": "c", "annotations": {bodies.LAST_APPLIED: json.dumps(configmap)}}}
    bodies.mask_secrets(applied, Counter(), secrets_response=False)
    assert json.loads(applied["metadata"]["annotations"][bodies.LAST_APPLIED])["data"] == {"k": "v"}


def test_watch_events_are_masked_one_by_one_whatever_the_chunking() -> None:
    events = [
        {"type": "ADDED", "object": {"kind": "Secret", "metadata": {"name": f"s{i}"}, "data": {"p": "c2VjcmV0"}}}
        for i in range(5)
    ]
    stream = b"".join(json.dumps(e).encode() + b"\n" for e in events)
    for size in (1, 7, 64, len(stream)):
        seen, on_error = errors()
        m = masking(MaskPlan.EMPTY, kubernetes=True, secrets=True)
        fn = bodies.json_event_stream(m, 1 << 20, bodies.Tap(), on_error)  # type: ignore[arg-type]
        out = b"".join(run(fn, [stream[i : i + size] for i in range(0, len(stream), size)]))
        lines = [json.loads(line) for line in out.splitlines()]
        assert [e["object"]["metadata"]["name"] for e in lines] == [f"s{i}" for i in range(5)]
        assert all(e["object"]["data"]["p"] == bodies.REDACTED_B64 for e in lines)
        assert not seen


def test_watch_event_size_is_bounded() -> None:
    seen, on_error = errors()
    fn = bodies.json_event_stream(masking(), 100, bodies.Tap(), on_error)  # type: ignore[arg-type]
    out = run(fn, [b'{"a": "' + b"x" * 200])
    assert out == [] and len(seen) == 1


@pytest.mark.parametrize("limit", [10])
def test_masking_failures_stop_the_stream(limit: int) -> None:
    seen, on_error = errors()
    fn = bodies.document_stream(masking(), limit, bodies.Tap(), on_error)  # type: ignore[arg-type]
    assert fn(b"x" * 20) == []
    assert fn(b"more") == [] and fn(b"") == []  # nothing after a failure, not even the end
    assert len(seen) == 1


def test_scrubber_blanks_credentials_across_chunks_without_delaying_lines() -> None:
    secret = b"Bearer upstream-secret-1234"
    text = b"line one\nyou sent " + secret + b" ok\nlast " + secret
    for size in (1, 2, 5, 7, 13, len(text)):
        scrubber = bodies.Scrubber([secret, secret.split(b" ", 1)[1]])
        out = b"".join(
            b"".join(scrubber.feed([text[i : i + size]], False)) for i in range(0, len(text), size)
        ) + b"".join(scrubber.feed([], True))
        assert out == text.replace(secret, b"*" * len(secret)), size
        assert len(out) == len(text)
    scrubber = bodies.Scrubber([secret])
    assert scrubber.feed([b'{"event": 1}\n'], False) == [b'{"event": 1}\n']  # a finished line is not held


def test_service_account_tokens_are_masked_wherever_a_decoder_would_read_them() -> None:
    counts: Counter[str] = Counter()
    issued = {
        "kind": "TokenRequest",
        "spec": {"audiences": ["x"]},
        "status": {"token": "a.b.c", "expirationTimestamp": "t"},
    }
    assert bodies.mask_tokens(issued, counts)["status"] == {"token": bodies.REDACTED, "expirationTimestamp": "t"}
    review = {"Spec": {"Token": "a.b.c"}, "status": None}
    assert bodies.mask_tokens(review, counts) == {"Spec": {"Token": bodies.REDACTED}, "status": None}
    assert counts["token"] == 2
    for unknown in (["a.b.c"], {"spec": "a.b.c"}, {"status": ["a.b.c"]}):
        with pytest.raises(bodies.BodyError):
            bodies.mask_tokens(unknown, counts)


def test_oauth_credentials_are_masked_by_field_name_in_json_and_forms() -> None:
    counts: Counter[str] = Counter()
    doc = {
        "AccessToken": "a",
        "result": [{"refreshToken": "r", "id-token": None}],
        "grant_type": "authorization_code",
        "code": "c",
        "nested": {"code": 404, "token_type": "Bearer"},  # no grant here: an ordinary code
    }
    assert bodies.mask_credentials(doc, counts) == {
        "AccessToken": bodies.REDACTED,
        "result": [{"refreshToken": bodies.REDACTED, "id-token": None}],
        "grant_type": "authorization_code",
        "code": bodies.REDACTED,
        "nested": {"code": 404, "token_type": "Bearer"},
    }
    assert counts["credential"] == 3
    form = b"grant_type=authorization_code&code=xyz&client%5Fsecret=s3&Password=p+w&scope=a+b&redirect_uri=x"
    masked = bodies.mask_form_credentials(form, Counter())
    assert masked == (
        b"grant_type=authorization_code&code=%5BREDACTED%3Alictor%5D&client%5Fsecret=%5BREDACTED%3Alictor%5D"
        b"&Password=%5BREDACTED%3Alictor%5D&scope=a+b&redirect_uri=x"
    )
    assert bodies.mask_form_credentials(b"code=1&state=2", Counter()) == b"code=1&state=2"


def test_multipart_credentials_are_masked_part_by_part_also_cut_short() -> None:
    body = (
        b'--XX\r\nContent-Disposition: form-data; name="grant_type"\r\n\r\nauthorization_code\r\n'
        b'--XX\r\nContent-Disposition: form-data; name="file"; filename="password"\r\n\r\nfile data\r\n'
        b"--XX\r\nContent-Disposition: form-data; name=code\r\n\r\nac-123\r\n"
        b'--XX\r\nContent-Disposition: form-data; name="Client-Secret"\r\n\r\ncs-456\r\n--XX--\r\n'
    )
    counts: Counter[str] = Counter()
    masked = bodies.mask_multipart_credentials(body, b"XX", counts)
    assert masked == body.replace(b"ac-123", b"[REDACTED:lictor]").replace(b"cs-456", b"[REDACTED:lictor]")
    assert counts["credential"] == 2
    cut = body[: body.index(b"cs-456") + 3]  # cut inside the secret: what is there is masked all the same
    assert bodies.mask_multipart_credentials(cut, b"XX", Counter()).endswith(
        b'"Client-Secret"\r\n\r\n[REDACTED:lictor]'
    )
    assert bodies.multipart_boundary('multipart/form-data; boundary="a b"') == b"a b"
    assert bodies.multipart_boundary("multipart/form-data") is None
