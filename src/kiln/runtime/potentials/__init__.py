"""Potentials for SMC steering: Φ over generated text with prefix/complete semantics (base.py).

Shipped potentials (each module has one job; none imports torch):

==========================  =========  ==========  =============================================
potential                   kind       logw_next   prefix / complete
==========================  =========  ==========  =============================================
Regex, JsonSchema,          Boolean    mask        viable prefix (llguidance matcher not in error)
LarkGrammar (grammar.py)                           / matcher accepting
StopSequences, SentenceEnd  hard/soft  EOS only    0 / ends with a stop string or sentence end
(text.py)                                          (else −inf, or −penalty)
Length (length.py)          hard/soft  yes         hard: len ≤ max / min ≤ len ≤ max;
                                                   soft: 0 / −penalty·distance to [min, max]
Lexicon (lexicon.py)        soft       yes         Σ weights of finished listed words (+ the last
                                                   word at complete); `Lexicon.style(...)`
ReferenceCritic (critic.py) soft       yes         β·log p_ref(x | prompt) / β·log p_ref(x EOS)
FromCallable (callable.py)  any        no          your functions of the decoded text
Product (p1 * p2), Scaled   —          if factors  sums of logs / β × logs
==========================  =========  ==========  =============================================

`from_spec(vocab, "regex:...")` builds one from a CLI spec (registry.py); `checks` holds the
contract checks (soundness, logw_next consistency, autoregressive factorization, batching,
immutability) used by the tests. Prompt-conditioned potentials get the prompt through
`potential.set_prompt(prompt_ids)` (a no-op for the others; products forward it).

Mask cost (llguidance 1.9.1, SmolLM2's 49152-token vocabulary, this 2-core machine while other
jobs kept it at load 6-8, fresh matchers along random accepted paths; tests/test_potentials.py::
test_mask_cost prints its figures): one mask takes ~20-100 µs for digit, JSON-schema and small
Lark grammars and ~0.3-0.45 ms for a regex that allows most words (`[A-Z][a-z]+( [a-z]+)*\\.`),
so 16 masks cost ~1-14 ms and 64 ~3-60 ms. Turning bitmasks into float rows is memory-bound
(196 KB per row: ~3 ms for 64 rows in warm memory, several times that when the pages are fresh),
so grammar potentials also offer `batch_mask` (the 6 KB bitmasks). llguidance's parallel fill
(`LLExecutor`) was no faster than a loop on 2 cores, so it is used only with >= 4 cores; states
shared by several particles are computed once.
"""

from __future__ import annotations

from kiln.runtime.potentials import checks
from kiln.runtime.potentials.base import Potential, Product, Scaled, State, Vocab
from kiln.runtime.potentials.callable import FromCallable
from kiln.runtime.potentials.critic import ReferenceCritic
from kiln.runtime.potentials.grammar import JsonSchema, LarkGrammar, LLGuidancePotential, Regex, ll_tokenizer
from kiln.runtime.potentials.length import Length
from kiln.runtime.potentials.lexicon import Lexicon
from kiln.runtime.potentials.registry import NAMES, from_spec
from kiln.runtime.potentials.styles import STYLES
from kiln.runtime.potentials.text import EndCondition, SentenceEnd, StopSequences

check_soundness = checks.check_soundness

__all__ = [
    "NAMES", "STYLES", "EndCondition", "FromCallable", "JsonSchema", "LLGuidancePotential", "LarkGrammar",
    "Length", "Lexicon", "Potential", "Product", "ReferenceCritic", "Regex", "Scaled", "SentenceEnd", "State",
    "StopSequences", "Vocab", "check_soundness", "checks", "from_spec", "ll_tokenizer",
]
