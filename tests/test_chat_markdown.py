"""Agent output is untrusted: the Markdown renderer must never let script through."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chat.markdown import render_markdown

ATTACKS = [
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "[x](javascript:alert(1))",
    "[x](JaVaScRiPt:alert(1))",
    "[x](data:text/html;base64,PHNjcmlwdD4=)",
    '<a href="javascript:alert(1)">x</a>',
    "![x](javascript:alert(1))",
    "<svg onload=alert(1)>",
    "<iframe src=https://example.com></iframe>",
]


def dangerous(html: str) -> list[str]:
    """Real tags (not escaped text) that could run script."""
    found = re.findall(r"<(script|img|svg|iframe|object|embed)\b", html, re.I)
    found += re.findall(r"<[a-z][^>]*\son\w+\s*=", html, re.I)
    found += re.findall(r'<a\b[^>]*href="(?!https?:|mailto:)[^"]*"', html, re.I)
    return found


@pytest.mark.parametrize("attack", ATTACKS)
def test_it_neutralises(attack: str) -> None:
    assert dangerous(render_markdown(attack)) == []


def test_it_renders_code_lists_and_safe_links() -> None:
    html = render_markdown(
        "Some **bold** text\n\n- one\n- two\n\n```py\nx = 1 < 2\n```\n\n[docs](https://example.com)"
    )
    assert "<strong>bold</strong>" in html
    assert "<li>one</li>" in html
    assert '<code class="language-py">x = 1 &lt; 2' in html
    assert '<a href="https://example.com" rel="noopener noreferrer">docs</a>' in html


@given(st.text(max_size=300))
def test_it_never_emits_a_script_or_handler(text: str) -> None:
    assert dangerous(render_markdown(text)) == []
