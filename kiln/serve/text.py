"""Tokens to text as they stream: the continuation is decoded whole each time (so multi-byte
characters come out complete) and text that could still become a stop string is held back."""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.tokens: list[int] = []
        self.sent = 0  # characters of the decoded text already emitted
        self.text = ""  # the decoded text, cut at a stop string once one is seen
        self.stopped = False  # a stop string was found: the text ends before it

    def feed(self, token: int) -> str:
        """The new text that can be emitted after `token` ('' while it is held back)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        full = self.tokenizer.decode(self.tokens, skip_special_tokens=True) if self.tokenizer else ""
        if full.endswith("\ufffd"):
            return ""  # an incomplete multi-byte character: wait for the next token
        cut = min((i for i in (full.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self.text = True, full[:cut]
            return self._emit(len(self.text))
        self.text = full
        hold = max((len(s) - 1 for s in self.stop), default=0)
        # hold back a tail that is a prefix of a stop string
        safe = len(full)
        for s in self.stop:
            for k in range(min(hold, len(full)), 0, -1):
                if s.startswith(full[-k:]):
                    safe = min(safe, len(full) - k)
                    break
        return self._emit(safe)

    def flush(self) -> str:
        """At the end: whatever was held back (the text never became a stop string)."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.sent)
        out, self.sent = self.text[self.sent:upto], upto
        return out
