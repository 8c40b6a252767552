"""HTML mail is sanitised against an allow-list: nothing runs, nothing loads, nothing private."""
from __future__ import annotations

from html.parser import HTMLParser

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailflow.core.redaction import RedactionRule, Redactor, private_values
from mailflow.mail.sanitise import (ALLOWED_ATTRIBUTES, ALLOWED_TAGS, URL_SCHEMES, redact_html,
                                    sanitise_html)
from tests.test_redaction import DOMAIN, EMAIL, SECRETS, THREAD

XSS = [
    "<script>alert(1)</script>",
    "<SCRIPT SRC=http://evil.example/x.js></SCRIPT>",
    "<scr<script>ipt>alert(1)</scr</script>ipt>",
    "<<script>script>alert(1)<</script>/script>",
    '<p onclick="alert(1)" onmouseover=alert(1)>hi</p>',
    '<body onload=alert(1)>', '<div/onmouseover="alert(1)">x</div>',
    '<a href="javascript:alert(1)">x</a>', '<a href="JaVaScRiPt:alert(1)">x</a>',
    '<a href="&#106;&#97;&#118;&#97;&#115;&#99;&#114;&#105;&#112;&#116;&#58;alert(1)">x</a>',
    '<a href="&#x6A;avascript&#x3A;alert(1)">x</a>', '<a href="java\tscript:alert(1)">x</a>',
    '<a href="java&#x09;script:alert(1)">x</a>', '<a href=" \x01javascript:alert(1)">x</a>',
    '<a href="vbscript:msgbox(1)">x</a>', '<a href="VBScript:msgbox(1)">x</a>',
    '<a href="data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==">x</a>',
    '<a href="DATA:text/html,<script>alert(1)</script>">x</a>',
    '<img src=x onerror=alert(1)>', '<img src="http://tracker.example/p.gif">',
    '<img src="cid:part1@example">', '<image src=x onerror=alert(1)>',
    '<svg onload=alert(1)>', '<svg><script>alert(1)</script></svg>',
    '<svg><a xlink:href="javascript:alert(1)"><text>x</text></a></svg>',
    '<svg><animate onbegin=alert(1) attributeName=x dur=1s>',
    '<math><mtext><table><mglyph><style><img src=x onerror=alert(1)>',
    '<math href="javascript:alert(1)">x</math>',
    '<div style="background:url(javascript:alert(1))">x</div>',
    '<div style="background-image: url(http://tracker.example/p.gif)">x</div>',
    '<p style="width: expression(alert(1))">x</p>',
    '<style>@import "http://evil.example/x.css"; body{background:url(x)}</style>',
    '<link rel=stylesheet href="http://evil.example/x.css">',
    '<!--<script>alert(1)</script>-->', '<!--><script>alert(1)</script>-->',
    '<!--[if gte mso 9]><img src=x onerror=alert(1)><![endif]-->',
    '<noscript><p title="</noscript><img src=x onerror=alert(1)>">',
    '<template><script>alert(1)</script></template>',
    '<meta http-equiv="refresh" content="0;url=javascript:alert(1)">',
    '<base href="javascript:alert(1)//">', '<base href="http://evil.example/">',
    '<iframe src="javascript:alert(1)"></iframe>', '<iframe srcdoc="<script>alert(1)</script>">',
    '<object data="javascript:alert(1)">', '<embed src="javascript:alert(1)">',
    '<form action="javascript:alert(1)"><input type=submit formaction="http://x"></form>',
    '<button formaction="javascript:alert(1)">x</button>', '<isindex action=javascript:alert(1)>',
    '<input onfocus=alert(1) autofocus>', '<details open ontoggle=alert(1)>',
    '<video><source onerror=alert(1)></video>', '<audio src=x onerror=alert(1)>',
    '<table background="javascript:alert(1)"><td background="http://t.example/x.gif">x</td></table>',
    '<a href="http://ok.example" target="_blank" rel="opener" ping="http://t.example">x</a>',
    '<b><i>unclosed <p>nest</b></i>', '<p><div><p>x</div></p>', '</p></p><p<p>>',
    '<a href="http://x.example"><a href="javascript:alert(1)">nested</a></a>',
    '<xmp><script>alert(1)</script></xmp>', '<plaintext><script>alert(1)',
    '<textarea><script>alert(1)</script></textarea>', '<title><script>alert(1)</script></title>',
    '<p title="&quot;><script>alert(1)</script>">x</p>',
    '<a title="x" onmouseover="alert(1)" href="https://ok.example/?q=javascript:x">ok</a>',
    'text javascript:alert(1) and url(x) and expression(y)',
    '<td colspan="2" rowspan="1; background:url(x)">x</td>',
]


class _Structure(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))

    handle_startendtag = handle_starttag


def assert_safe(out: str) -> None:
    low = out.lower()
    for bad in ("<script", "<img", "<svg", "<math", "<style", "<iframe", "<form", "<meta", "<base",
                "javascript:", "vbscript:", "url(", "expression(", "<!--"):
        assert bad not in low, (bad, out)
    parser = _Structure()
    parser.feed(out)
    parser.close()
    for tag, attrs in parser.tags:
        assert tag in ALLOWED_TAGS, out
        for name, value in attrs:
            assert not name.startswith("on"), out
            assert name in ALLOWED_ATTRIBUTES.get(tag, set()) | ({"rel"} if tag == "a" else set()), out
            if name == "href":
                assert value and value.split(":", 1)[0].lower() in URL_SCHEMES, out
            if name == "rel":
                assert value == "nofollow noopener noreferrer"


@pytest.mark.parametrize("payload", XSS)
def test_xss_corpus_is_neutralised(payload: str) -> None:
    assert_safe(sanitise_html(payload))
    assert_safe(sanitise_html(f"<p>before</p>{payload}<p>after</p>"))


FRAGMENTS = XSS + ["<p>", "</p>", "<a href='http://ok.example'>", "</a>", "<b>", "</b>", "<",
                   ">", '"', "'", "=", "&", "&#", "x", "<!--", "-->", "<td colspan=", "<table>",
                   "<svg>", "<math>", "<noscript>", "</noscript>", "<style>", "</style>"]


@settings(max_examples=300)
@given(st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=12)), max_size=12))
def test_any_mix_of_hostile_fragments_comes_out_safe(parts: list[str]) -> None:
    out = sanitise_html("".join(parts))
    assert_safe(out)
    assert_safe(sanitise_html(out))


@settings(max_examples=200)
@given(st.text(max_size=300))
def test_any_text_comes_out_safe(text: str) -> None:
    assert_safe(sanitise_html(text))


def test_what_is_allowed_is_kept() -> None:
    html = ('<h2>Reply</h2><p>See <a href="https://gov.example/a?b=1&amp;c=2" title="t">the '
            'report</a> and <a href="mailto:foi@gov.example">write</a>.</p>'
            '<table><thead><tr><th colspan="2">Year</th></tr></thead><tbody><tr>'
            '<td rowspan="2">2024</td><td><strong>12</strong></td></tr></tbody></table>'
            '<blockquote><pre><code>x</code></pre></blockquote><ul><li><em>a</em></li></ul>'
            '<p>H<sub>2</sub>O, x<sup>2</sup></p><hr>')
    out = sanitise_html(html)
    rel = ' rel="nofollow noopener noreferrer"'
    assert f'<a href="https://gov.example/a?b=1&amp;c=2" title="t"{rel}>the report</a>' in out
    assert f'<a href="mailto:foi@gov.example"{rel}>write</a>' in out
    assert '<th colspan="2">Year</th>' in out and '<td rowspan="2">2024</td>' in out
    for tag in ("h2", "table", "thead", "tbody", "blockquote", "pre", "code", "ul", "li", "em",
                "strong", "sub", "sup", "hr"):
        assert f"<{tag}" in out


def test_relative_and_fragment_links_are_dropped() -> None:
    # Relative to the archive page, they would point into our own site.
    assert sanitise_html('<a href="/admin">x</a><a href="#top">y</a><a href="x.html">z</a>') == \
        '<a rel="nofollow noopener noreferrer">x</a>' \
        '<a rel="nofollow noopener noreferrer">y</a><a rel="nofollow noopener noreferrer">z</a>'


def test_style_and_script_content_is_removed_not_shown() -> None:
    assert sanitise_html("<style>p{color:red}</style><script>var a;</script><p>x</p>") == "<p>x</p>"


# --------------------------------------------------------------------------------- redacting

def _redactor() -> Redactor:
    rules = [RedactionRule("site", r"07700 ?900 ?123", True, '<script>alert("label")</script>'),
             RedactionRule("thread:12", "Jane Citizen", False, "[name removed]")]
    return Redactor(rules, thread_id=12, authority=None, private=private_values(THREAD, DOMAIN))


def _check(out: str) -> None:
    assert_safe(out)
    low = out.lower()
    for secret in SECRETS + ["jane citizen", "07700", "jane.citizen"]:
        assert secret.lower() not in low, (secret, out)


@pytest.mark.parametrize("html", [
    f'<p>From <a href="mailto:{EMAIL}">Jane Citizen</a> &lt;{EMAIL.upper()}&gt;</p>',
    '<p><a href="mailto:jane.citizen&#64;citizen.example">write</a></p>',
    '<p><a href="mailto:%6a%61%6e%65.citizen%40citizen.example">write</a></p>',
    '<p>jane.<span>citizen</span>@citizen.example</p>',
    '<p>Jane<b></b>&nbsp;Citizen, 07700<i> 900</i>123</p>',
    '<p>reply to <b>request-12-</b>abcdefghjkmn@ask.example or token <i>abcdef</i>ghjkmn</p>',
    '<blockquote>On Monday, Jane Citizen &lt;jane.citizen@citizen.example&gt; wrote: '
    'reply-12-pqrstvwxyz01@ask.example</blockquote>',
    '<p title="jane.citizen@citizen.example">x</p><a title="Jane Citizen" href="https://x.example/'
    '?to=jane.citizen%40citizen.example">y</a>',
])
def test_redacted_html_shows_nothing_private(html: str) -> None:
    _check(redact_html(html, _redactor()))


def test_a_replacement_is_text_never_markup() -> None:
    out = redact_html("<p>call 07700 900123</p>", _redactor())
    assert out == '<p>call &lt;script&gt;alert("label")&lt;/script&gt;</p>'


def test_formatting_survives_when_nothing_is_split() -> None:
    out = redact_html(f"<p><b>Dear</b> Jane Citizen, write to {EMAIL}</p>", _redactor())
    assert out == "<p><b>Dear</b> [name removed], write to [requester email]</p>"


@settings(max_examples=150)
@given(st.lists(st.sampled_from(SECRETS + ["Jane Citizen", "07700 900123"]), min_size=1, max_size=3),
       st.lists(st.sampled_from(["<b>", "</b>", "<span>", "</span>", "<i></i>", "<a href='mailto:x@y.example'>",
                                 "</a>", "<p>", " ", "&nbsp;"]), max_size=6),
       st.data())
def test_secrets_cut_by_inline_tags_never_show(secrets: list[str], tags: list[str],
                                              data: st.DataObject) -> None:
    html = ""
    for s in secrets:
        cut = data.draw(st.integers(0, len(s)))
        html += s[:cut] + "".join(tags) + s[cut:] + " and "
    out = redact_html(html, _redactor())
    assert_safe(out)
    if "<p>" not in tags and " " not in tags and "&nbsp;" not in tags:
        _check(out)
