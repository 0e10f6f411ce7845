"""The prompt does not depend on the day it is rendered: ``model.date_string`` reaches the chat template
(Llama-3 templates print ``strftime_now`` otherwise)."""
import datetime as dt

import pytest
from conftest import chat_tokenizer

from robust_unlearn.config import load_recipe
from robust_unlearn.data.collate import QAFormatter, formatter_for

TEMPLATE = ("{%- if date_string is not defined %}{%- set date_string = strftime_now('%d %b %Y') %}{%- endif %}"
            "<s>system: Today Date: {{ date_string }}\n"
            "{%- for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{%- endfor %}"
            "{%- if add_generation_prompt %}<s>assistant:{%- endif %}")


@pytest.fixture
def tok():
    return chat_tokenizer("Today Date system user assistant 10 Apr 2025 Jan Jun Who wrote the book? Nobody.", TEMPLATE)


def _on(day: dt.datetime, monkeypatch):
    import transformers.utils.chat_template_utils as ctu

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return day

    monkeypatch.setattr(ctu, "datetime", Frozen)


def test_prompt_ids_identical_on_two_system_dates(tok, monkeypatch):
    cfg = load_recipe(None, [])
    assert cfg["model"]["date_string"] == "10 Apr 2025"
    ids = []
    for day in (dt.datetime(2026, 1, 2), dt.datetime(2027, 6, 30)):
        _on(day, monkeypatch)
        fmt = formatter_for(tok, cfg)
        ids.append((fmt.prompt_ids("Who wrote the book?"), fmt.encode("Who wrote the book?", "Nobody.")))
    assert ids[0] == ids[1]
    assert "10 Apr 2025" in tok.decode(ids[0][0])
    # without it the template prints the system date: the ids differ (the check above can fail)
    got = []
    for day in (dt.datetime(2026, 1, 2), dt.datetime(2027, 6, 30)):
        _on(day, monkeypatch)
        got.append(QAFormatter(tok, "chat", None, date_string=None).prompt_ids("Who wrote the book?"))
    assert got[0] != got[1]
