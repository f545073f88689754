"""Word lists for `Lexicon.style(...)`: +1 for words typical of a register, −1 for words typical of
its opposite. Written for kiln (not copied from anywhere); deliberately modest — a style potential
is a gentle twist, not a classifier. Lowercase single words; matching is case-insensitive."""

from __future__ import annotations

_FORMAL_PLUS = """
accordingly additionally approximately consequently considerable demonstrate demonstrates
furthermore hence however indicate indicates moreover nevertheless nonetheless notably
particularly regarding significant significantly subsequently substantial therefore thus
whereas whereby wherein ascertain commence facilitate obtain require requires sufficient
respectively principal objective regard pertaining
"""

_CASUAL = """
gonna wanna gotta kinda sorta yeah yep nope hey cool awesome stuff lol ok okay guys totally
super basically literally dude nah huh wow omg btw
"""

_CONVERSATIONAL_PLUS = """
you your we us our hey yeah sure really pretty just so well okay actually honestly totally
cool great thanks thank glad guess maybe anyway right oh
"""

_STIFF = """
therefore furthermore moreover hereby thus whereas notwithstanding herein aforementioned
henceforth thereof wherein pursuant heretofore
"""

_TECHNICAL_PLUS = """
algorithm algorithms api architecture bandwidth buffer byte bytes cache compile compiler
configuration cpu data database default dependency function functions gpu implementation
index interface kernel latency library matrix memory module parameter parameters protocol
query runtime schema server thread threads throughput token tokens vector version
"""

_EMOTIVE = """
amazing awesome beautiful feel feeling love lovely magical wonderful incredible adorable
gorgeous heartwarming dreamy
"""


def _weights(plus: str, minus: str) -> dict[str, float]:
    out = {w: 1.0 for w in plus.split()}
    for w in minus.split():
        out[w] = out.get(w, 0.0) - 1.0
    return {w: v for w, v in out.items() if v}


STYLES: dict[str, dict[str, float]] = {
    "formal": _weights(_FORMAL_PLUS, _CASUAL),
    "conversational": _weights(_CONVERSATIONAL_PLUS, _STIFF),
    "technical": _weights(_TECHNICAL_PLUS, _EMOTIVE),
}
