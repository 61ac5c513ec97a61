"""Authentication-Results as RFC 8601 writes them: its Appendix B examples as a table, read the
way the bridge reads them (header section → unfolded value → authres), plus the readings that
decide whether a trusted MTA's DMARC failure is enforced."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from bridge.email.auth import HeaderSection, read_header_section
from bridge.email.auth.results import dmarc_of, find_trusted, parse


@dataclass(frozen=True)
class Expected:
    method: str
    result: str
    version: str | None = None
    reason: str | None = None
    properties: dict[str, str] = field(default_factory=dict)
    comments: list[str] = field(default_factory=list)


# (name, header fields as written in the RFC, folded; authserv-id of each; results of each)
APPENDIX_B = [
    (
        "B.2 service provided, no authentication done",
        ["Authentication-Results: example.org 1; none"],
        [("example.org", [])],
    ),
    (
        "B.3 service provided, authentication done",
        ["Authentication-Results: example.com;\r\n          spf=pass smtp.mailfrom=example.net"],
        [("example.com", [Expected("spf", "pass", properties={"smtp.mailfrom": "example.net"})])],
    ),
    (
        "B.4 several authentications, single MTA",
        [
            "Authentication-Results: example.com;\r\n"
            "          auth=pass (cram-md5) smtp.auth=sender@example.net;\r\n"
            "          spf=pass smtp.mailfrom=example.net",
            "Authentication-Results: example.com;\r\n"
            "          iprev=pass policy.iprev=192.0.2.200",
        ],
        [
            (
                "example.com",
                [
                    Expected(
                        "auth",
                        "pass",
                        properties={"smtp.auth": "sender@example.net"},
                        comments=["cram-md5"],
                    ),
                    Expected("spf", "pass", properties={"smtp.mailfrom": "example.net"}),
                ],
            ),
            (
                "example.com",
                [Expected("iprev", "pass", properties={"policy.iprev": "192.0.2.200"})],
            ),
        ],
    ),
    (
        "B.5 several authentications, different MTAs",
        [
            "Authentication-Results: example.com;\r\n"
            "          dkim=pass (good signature) header.d=example.com",
            "Authentication-Results: example.com;\r\n"
            "          auth=pass (cram-md5) smtp.auth=sender@example.com;\r\n"
            "          spf=fail smtp.mailfrom=example.com",
        ],
        [
            (
                "example.com",
                [
                    Expected(
                        "dkim",
                        "pass",
                        properties={"header.d": "example.com"},
                        comments=["good signature"],
                    )
                ],
            ),
            (
                "example.com",
                [
                    Expected(
                        "auth",
                        "pass",
                        properties={"smtp.auth": "sender@example.com"},
                        comments=["cram-md5"],
                    ),
                    Expected("spf", "fail", properties={"smtp.mailfrom": "example.com"}),
                ],
            ),
        ],
    ),
    (
        "B.6 multi-tiered authentication",
        [
            "Authentication-Results: example.com;\r\n"
            '      dkim=pass reason="good signature"\r\n'
            "        header.i=@mail-router.example.net;\r\n"
            '      dkim=fail reason="bad signature"\r\n'
            "        header.i=@newyork.example.com",
            "Authentication-Results: example.net;\r\n"
            "      dkim=pass (good signature) header.i=@newyork.example.com",
        ],
        [
            (
                "example.com",
                [
                    Expected(
                        "dkim",
                        "pass",
                        reason="good signature",
                        properties={"header.i": "@mail-router.example.net"},
                    ),
                    Expected(
                        "dkim",
                        "fail",
                        reason="bad signature",
                        properties={"header.i": "@newyork.example.com"},
                    ),
                ],
            ),
            (
                "example.net",
                [
                    Expected(
                        "dkim",
                        "pass",
                        properties={"header.i": "@newyork.example.com"},
                        comments=["good signature"],
                    )
                ],
            ),
        ],
    ),
    (
        "B.7 comment-heavy",
        [
            "Authentication-Results: foo.example.net (foobar) 1 (baz);\r\n"
            "    dkim (Because I like it) / 1 (One yay) = (wait for it) fail\r\n"
            "      policy (A dot can go here) . (like that) expired\r\n"
            "      (this surprised me) = (as I wasn't expecting it) 1362471462",
        ],
        [
            (
                "foo.example.net",
                [
                    Expected(
                        "dkim",
                        "fail",
                        version="1",
                        properties={"policy.expired": "1362471462"},
                        comments=[
                            "Because I like it",
                            "One yay",
                            "wait for it",
                            "A dot can go here",
                            "like that",
                            "this surprised me",
                            "as I wasn't expecting it",
                        ],
                    )
                ],
            )
        ],
    ),
]


def _values(fields: list[str]) -> list[str]:
    """The unfolded values, through the same header reading the listener uses."""
    raw = ("\r\n".join(["From: a@example.com", *fields]) + "\r\n\r\nbody\r\n").encode()
    section = read_header_section(raw)
    assert isinstance(section, HeaderSection), section
    return section.all("authentication-results")


@pytest.mark.parametrize(("name", "fields", "expected"), APPENDIX_B, ids=[e[0] for e in APPENDIX_B])
def test_rfc8601_appendix_b(
    name: str, fields: list[str], expected: list[tuple[str, list[Expected]]]
) -> None:
    parsed = [parse(value) for value in _values(fields)]
    got = [
        (
            p.authserv_id,
            [
                Expected(r.method, r.result, r.version, r.reason, r.properties, r.comments)
                for r in p.results
            ],
        )
        for p in parsed
        if p is not None
    ]
    assert got == expected


@pytest.mark.parametrize(
    "value",
    [
        "mx.example.com; dmarc / 1 = fail (p=reject) header.from=bank.example",
        "mx.example.com; dmarc/1=fail policy.dmarc=reject header.from=bank.example",
        'mx.example.com (ours) ; dmarc (checked) = fail reason="p=reject"'
        " header.from=bank.example",
    ],
    ids=["versioned-spaces", "versioned-policy-property", "comments-and-reason"],
)
def test_a_versioned_dmarc_failure_is_read_as_dmarc(value: str) -> None:
    # Once read as a method called "1": the p=reject failure was then delivered.
    trusted = find_trusted([value], "mx.example.com")
    assert trusted is not None
    assert dmarc_of(trusted) == ("fail", "reject", "bank.example")


@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        "mx.example.com",  # no resinfo and no "none"
        "mx.example.com; dkim",  # a method without a result
        "mx.example.com; dkim=pass (unterminated comment",
        "mx.example.com; " + "dkim=pass header.d=x.example; " * 2000,  # over the length cap
    ],
)
def test_unreadable_headers_are_not_believed(value: str) -> None:
    assert parse(value) is None
    assert find_trusted([value], "mx.example.com") is None
