"""`kiln chat`: an interactive terminal chat with an artifact.

`ChatSession` (session.py) holds the logic and can be driven without a terminal: the history within
the context, the chat template, streaming, SMC for constrained answers, the slash commands.
`History` (history.py) is the conversation and its trimming; terminal.py is the thin read-print loop.
"""

from kiln.chat.history import History, Turn, is_saved_chat
from kiln.chat.session import ChatOptions, ChatSession, Outcome, Reply

__all__ = ["ChatOptions", "ChatSession", "History", "Outcome", "Reply", "Turn", "is_saved_chat"]
