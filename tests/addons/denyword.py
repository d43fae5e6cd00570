"""A hook-only addon for tests: denies line commands containing DENY_WORD."""

DENY_WORD = "forbidden"


class DenyWord:
    name = "denyword"

    def request(self, flow):
        if DENY_WORD in flow.request.payload:
            flow.deny(f"the word {DENY_WORD!r} is not allowed", "denyword:block")


addons = [DenyWord()]
