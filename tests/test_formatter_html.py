"""Sanitising mail HTML to the Matrix `formatted_body` subset, and rendering HTML as plain text."""

from __future__ import annotations

import pytest

from bridge.formatter.html import html_to_text, sanitize_html, text_to_html

# (input, exact sanitised output)
SANITISED = [
    # Script and style go with their content, not just their tags.
    ("<p>Hi</p><script>alert(1)</script>", "<p>Hi</p>"),
    ("<p>Hi<script type='text/javascript'>document.cookie</script></p>", "<p>Hi</p>"),
    ("<style>p { color: red }</style><p>Hi</p>", "<p>Hi</p>"),
    ("<html><head><title>Title</title><style>.x{}</style></head><body>Hi</body></html>", "Hi"),
    ("<p>a</p><noscript>no script</noscript><iframe src='https://x'>frame</iframe>", "<p>a</p>"),
    ("<svg><script>alert(1)</script><text>svg</text></svg>ok", "ok"),
    # Event handlers and unknown attributes.
    (
        '<p onclick="alert(1)" onmouseover="x()" style="color:red" class="c" id="i">Hi</p>',
        "<p>Hi</p>",
    ),
    ('<img src="mxc://example.org/abc" onerror="alert(1)">', '<img src="mxc://example.org/abc">'),
    # Links: only http, https, ftp, mailto and magnet survive.
    ('<a href="javascript:alert(1)">x</a>', '<a rel="noopener">x</a>'),
    ('<a href="JaVaScRiPt:alert(1)">x</a>', '<a rel="noopener">x</a>'),
    ('<a href="java&#x0A;script:alert(1)">x</a>', '<a rel="noopener">x</a>'),
    ('<a href=" &#1;javascript:alert(1)">x</a>', '<a rel="noopener">x</a>'),
    ('<a href="data:text/html;base64,PHNjcmlwdD4=">x</a>', '<a rel="noopener">x</a>'),
    ('<a href="vbscript:msgbox(1)">x</a>', '<a rel="noopener">x</a>'),
    ('<a href="/relative/path">x</a>', '<a rel="noopener">x</a>'),
    (
        '<a href="https://example.org/?a=1&amp;b=2" target="_blank">x</a>',
        '<a href="https://example.org/?a=1&amp;b=2" target="_blank" rel="noopener">x</a>',
    ),
    (
        '<a href="http://example.org" target="_top">x</a>',
        '<a href="http://example.org" rel="noopener">x</a>',
    ),
    (
        '<a href="mailto:bob@example.org">Bob</a>',
        '<a href="mailto:bob@example.org" rel="noopener">Bob</a>',
    ),
    ('<a href="ftp://example.org/f">f</a>', '<a href="ftp://example.org/f" rel="noopener">f</a>'),
    (
        '<a href="magnet:?xt=urn:btih:abc">m</a>',
        '<a href="magnet:?xt=urn:btih:abc" rel="noopener">m</a>',
    ),
    # Images: remote ones leak the reader, cid: ones are posted separately; only mxc stays.
    ('<p>a<img src="https://tracker.example/pixel.gif" width="1" height="1">b</p>', "<p>ab</p>"),
    ('<img src="http://example.org/a.png" alt="A">', ""),
    ('<img src="cid:logo@x" alt="logo">', ""),
    ('<img src="data:image/png;base64,iVBORw0KGgo=">', ""),
    ('<img alt="no src">', ""),
    (
        '<img src="mxc://example.org/abc" alt="cat" title="t" width="64" height="48px">',
        '<img src="mxc://example.org/abc" alt="cat" title="t" width="64">',
    ),
    # Allowed tags stay, with the attributes the spec lists, values checked.
    (
        "<h1>T</h1><h6>t</h6><p><b>b</b><i>i</i><u>u</u><s>s</s><del>d</del><sup>1</sup><sub>2</sub>"
        "</p>",
        "<h1>T</h1><h6>t</h6><p><b>b</b><i>i</i><u>u</u><s>s</s><del>d</del><sup>1</sup>"
        "<sub>2</sub></p>",
    ),
    (
        "<strong>s</strong><em>e</em><hr><br><pre><code>c</code></pre>",
        "<strong>s</strong><em>e</em><hr><br><pre><code>c</code></pre>",
    ),
    (
        '<ol start="3"><li>c</li></ol><ol start="x"><li>d</li></ol><ul><li>e</li></ul>',
        '<ol start="3"><li>c</li></ol><ol><li>d</li></ol><ul><li>e</li></ul>',
    ),
    (
        '<code class="language-python other">x</code><code class="evil">y</code>',
        '<code class="language-python">x</code><code>y</code>',
    ),
    (
        '<span data-mx-color="#ff0000" data-mx-bg-color="red">r</span>',
        '<span data-mx-color="#ff0000">r</span>',
    ),
    ('<font color="#00ff00" face="Arial" size="7">g</font>', '<font color="#00ff00">g</font>'),
    ('<span data-mx-spoiler="plot">twist</span>', '<span data-mx-spoiler="plot">twist</span>'),
    (
        "<table><caption>c</caption><thead><tr><th>h</th></tr></thead><tbody><tr><td>d</td></tr>"
        "</tbody></table>",
        "<table><caption>c</caption><thead><tr><th>h</th></tr></thead><tbody>"
        "<tr><td>d</td></tr></tbody></table>",
    ),
    (
        "<details><summary>More</summary>hidden</details>",
        "<details><summary>More</summary>hidden</details>",
    ),
    ("<blockquote><div>q</div></blockquote>", "<blockquote><div>q</div></blockquote>"),
    # Not in the subset: the tag goes, its text stays.
    ("<center><marquee>m</marquee><form><input value=v>f</form></center>", "mf"),
    # Matrix reply fallbacks must not be forgeable from an email.
    ("<mx-reply><blockquote>fake</blockquote></mx-reply>real", "<blockquote>fake</blockquote>real"),
    ("<p>a<!-- comment --></p>", "<p>a</p>"),
    ("<p>a &lt;b&gt; &amp; &quot;c&quot;</p>", '<p>a &lt;b&gt; &amp; "c"</p>'),
    # Trailing empty lines are trimmed.
    ("<div>Hi</div><div><br></div><br> <p></p>", "<div>Hi</div>"),
    ("<p><b>unclosed", "<p><b>unclosed</b></p>"),
]


@pytest.mark.parametrize(("html", "expected"), SANITISED)
def test_sanitize_html(html: str, expected: str) -> None:
    assert sanitize_html(html) == expected


@pytest.mark.parametrize(
    "html",
    [
        "<script>alert(1)</script>",
        "<ScRiPt>alert(1)</sCrIpT>",
        "<scr<script>ipt>alert(1)</script>",
        "<<script>script>alert(1)<</script>/script>",
        "<svg/onload=alert(1)>",
        "<img src=x onerror=alert(1)>",
        '<a href="javascript:alert(1)">x</a>',
        '<a href="&#106;avascript:alert(1)">x</a>',
        '<a href="jav&#x09;ascript:alert(1)">x</a>',
        '<iframe src="javascript:alert(1)"></iframe>',
        "<math><mtext><table><mglyph><style><img src=x onerror=alert(1)>",
        '<noscript><p title="</noscript><img src=x onerror=alert(1)>">',
        "<p>javascript:alert(1) as text is fine</p>",
    ],
)
def test_no_script_survives(html: str) -> None:
    cleaned = sanitize_html(html).lower()
    assert "<script" not in cleaned
    assert "onerror" not in cleaned and "onload" not in cleaned
    assert 'href="javascript:' not in cleaned and "src=" not in cleaned


@pytest.mark.parametrize(
    ("html", "expected"),
    [
        ("<p>One</p><p>Two</p>", "One\n\nTwo"),
        ("<div>One</div><div>Two</div>", "One\nTwo"),
        ("Line<br>break<br><br>gap", "Line\nbreak\n\ngap"),
        ("  lots   of\n\n  space  ", "lots of space"),
        ('<a href="https://example.org">the site</a>', "the site (https://example.org)"),
        ('<a href="https://example.org">https://example.org</a>', "https://example.org"),
        ('<a href="mailto:bob@example.org">bob@example.org</a>', "bob@example.org"),
        ('<a href="https://example.org"></a>', "https://example.org"),
        ('<a rel="noopener">no href</a>', "no href"),
        ("<ul><li>a</li><li>b</li></ul>", "- a\n- b"),
        ('<ol start="3"><li>c</li><li>d</li></ol>', "3. c\n4. d"),
        (
            "<p>Said:</p><blockquote><p>one<br>two</p><blockquote>deeper</blockquote></blockquote>"
            "<p>after</p>",
            "Said:\n\n> one\n> two\n>\n> > deeper\n\nafter",
        ),
        ("<pre>  keep\n    indent</pre>", "  keep\n    indent"),
        ("<p>x</p><pre>  keep\n    indent</pre>", "x\n\n  keep\n    indent"),
        ("<table><tr><td>a</td><td>b</td></tr><tr><td>c</td><td>d</td></tr></table>", "a b\nc d"),
        ("<p>a</p><hr><p>b</p>", "a\n\n----\n\nb"),
        ("<h1>Title</h1>text", "Title\n\ntext"),
        # Runs of &nbsp; are layout in mail HTML: one space in text.
        ("a &amp; b &lt;c&gt; &nbsp;&nbsp;d", "a & b <c> d"),
        ("<style>p{}</style><script>x()</script>visible", "visible"),
    ],
)
def test_html_to_text(html: str, expected: str) -> None:
    assert html_to_text(html) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain", "plain"),
        ("a < b & c > d", "a &lt; b &amp; c &gt; d"),
        ("<script>alert(1)</script>", "&lt;script&gt;alert(1)&lt;/script&gt;"),
        ("two\nlines", "two<br>lines"),
        ('"quotes" stay', '"quotes" stay'),
    ],
)
def test_text_to_html(text: str, expected: str) -> None:
    assert text_to_html(text) == expected
