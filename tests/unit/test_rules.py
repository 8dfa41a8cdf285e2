"""Access rules: which access a request needs, by method, host and decoded path; the
first matching rule wins, and every mistake in the file is named by rule and field."""

from __future__ import annotations

import textwrap
import threading

import pytest

from bridge.errors import BadRequest, ConfigError
from bridge.pipeline.rules import Access, Rule, Rules, normalise_path, path_readings

EXAMPLE = """
default: deny
rules:
  - id: static
    match:
      host: [app.example.com, "*.cdn.example.com"]
      path: [/static/, /favicon.ico]
      methods: [GET, HEAD]
    access: public
  - id: admin
    match: {path: "/admin/**"}
    access: aal2
    max_age: 10m
    when: {schema_id: admin}
  - id: export
    match: {path: "/api/*/export"}
    access: deny
  - match: {path: /app}
    access: authenticated
"""


def load(tmp_path, text: str) -> Rules:
    path = tmp_path / "rules.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return Rules.load(path)


def access(rules: Rules, path: str, method: str = "GET", host: str = "app.example.com") -> str:
    return rules.match(method, host, path).access.value


def label(rules: Rules, path: str, method: str = "GET", host: str = "app.example.com") -> str:
    return rules.match(method, host, path).label


@pytest.fixture
def example(tmp_path) -> Rules:
    return load(tmp_path, EXAMPLE)


# Which rule


def test_the_first_matching_rule_wins(tmp_path):
    rules = load(
        tmp_path,
        """
        rules:
          - {id: first, match: {path: /a}, access: public}
          - {id: second, match: {path: /a/b}, access: deny}
          - {id: third, match: {path: /}, access: aal2}
        """,
    )
    assert label(rules, "/a/b") == "rules[0] (first)"
    assert label(rules, "/b") == "rules[2] (third)"


def test_the_default_applies_when_no_rule_matches(example, tmp_path):
    assert label(example, "/nothing/here") == "default"
    assert example.match("GET", "app.example.com", "/nothing").access is Access.DENY
    without_default = load(tmp_path, "rules: [{match: {path: /x}, access: public}]")
    assert without_default.match("GET", "h", "/y").access is Access.AUTHENTICATED


def test_labels_name_the_rule_by_index_and_id(example):
    assert label(example, "/static/a.css") == "rules[0] (static)"
    assert label(example, "/app") == "rules[3]"
    assert label(example, "/elsewhere") == "default"


def test_a_rule_without_match_matches_everything(tmp_path):
    rules = load(tmp_path, "rules: [{access: public}, {match: {path: /x}, access: deny}]")
    assert access(rules, "/x", method="DELETE", host="other.test") == "public"


def test_without_a_file_everything_needs_a_session():
    rules = Rules.everything_authenticated()
    rule = rules.match("POST", "any.host", "/anything")
    assert (rule.label, rule.access, rule.max_age_s) == ("default", Access.AUTHENTICATED, None)
    assert rules.configured is False
    assert rules.hosts == ()
    # No rule depends on the path, so it is not judged: a malformed one is not refused.
    assert rules.match("GET", "h", "/%zz").label == "default"


def test_a_loaded_file_is_configured(example):
    assert example.configured is True


# Hosts


def test_host_matches_exactly_whatever_the_case_port_or_trailing_dot(example):
    for host in ("app.example.com", "APP.Example.COM", "app.example.com:8443", "app.example.com."):
        assert label(example, "/static/x", host=host) == "rules[0] (static)", host
    assert label(example, "/static/x", host="app.example.org") == "default"
    assert label(example, "/static/x", host="xapp.example.com") == "default"


def test_wildcard_host_matches_subdomains_but_not_the_domain_itself(example):
    assert label(example, "/static/x", host="eu.cdn.example.com") == "rules[0] (static)"
    assert label(example, "/static/x", host="a.b.cdn.example.com:443") == "rules[0] (static)"
    assert label(example, "/static/x", host="cdn.example.com") == "default"
    assert label(example, "/static/x", host="evilcdn.example.com") == "default"
    assert label(example, "/static/x", host=".cdn.example.com") == "default"


def test_ipv6_hosts_lose_brackets_and_port(tmp_path):
    rules = load(tmp_path, "rules: [{match: {host: '::1'}, access: public}]")
    assert access(rules, "/", host="[::1]:8080") == "public"
    assert access(rules, "/", host="[0:0::1]") == "public"
    assert access(rules, "/", host="[::2]") == "authenticated"


def test_hosts_lists_every_host_pattern_once_in_lower_case(tmp_path):
    rules = load(
        tmp_path,
        """
        rules:
          - {match: {host: [App.Example.com, "*.Example.com"]}, access: public}
          - {match: {host: app.example.com, path: /x}, access: deny}
          - {match: {host: other.test}, access: aal2}
          - {match: {path: /nohost}, access: deny}
        """,
    )
    assert rules.hosts == ("app.example.com", "*.example.com", "other.test")


# Paths


def test_a_path_without_wildcard_matches_itself_and_below_not_siblings(tmp_path):
    rules = load(tmp_path, "rules: [{match: {path: /admin}, access: deny}]")
    for path in ("/admin", "/admin/", "/admin/users/1"):
        assert access(rules, path) == "deny", path
    for path in ("/administrator", "/admi", "/", "/x/admin"):
        assert access(rules, path) == "authenticated", path


def test_a_path_ending_in_a_slash_is_a_plain_prefix(tmp_path):
    rules = load(tmp_path, "rules: [{match: {path: /static/}, access: public}]")
    assert access(rules, "/static/") == "public"
    assert access(rules, "/static/css/a.css") == "public"
    assert access(rules, "/static") == "authenticated"
    assert access(rules, "/staticfiles/a") == "authenticated"


def test_the_root_path_matches_every_path(tmp_path):
    rules = load(tmp_path, "rules: [{match: {path: /}, access: public}]")
    assert access(rules, "/") == "public"
    assert access(rules, "/any/thing") == "public"


def test_a_star_matches_within_one_segment(example):
    assert label(example, "/api/v1/export") == "rules[2] (export)"
    with pytest.raises(BadRequest, match="ambiguous"):
        label(example, "/api//export")  # as sent: an empty segment; normalised: /api/export
    assert label(example, "/api/v1/x/export") == "default"
    assert label(example, "/api/v1/export/more") == "default"


def test_a_double_star_matches_any_depth_including_none(tmp_path):
    rules = load(
        tmp_path,
        """
        rules:
          - {match: {path: "/admin/**"}, access: aal2}
          - {match: {path: "/reports/**/pdf"}, access: deny}
          - {match: {path: "/files/*.zip"}, access: public}
        """,
    )
    for path in ("/admin", "/admin/", "/admin/a/b/c"):
        assert access(rules, path) == "aal2", path
    assert access(rules, "/administrator") == "authenticated"
    for path in ("/reports/pdf", "/reports/2024/q1/pdf"):
        assert access(rules, path) == "deny", path
    assert access(rules, "/reports/xpdf") == "authenticated"
    assert access(rules, "/files/a.zip") == "public"
    assert access(rules, "/files/a/b.zip") == "authenticated"


def test_glob_characters_other_than_star_are_literal(tmp_path):
    rules = load(tmp_path, "rules: [{match: {path: '/a.b/[x]/*'}, access: deny}]")
    assert access(rules, "/a.b/[x]/y") == "deny"
    assert access(rules, "/aXb/x/y") == "authenticated"


def test_the_query_string_is_ignored(example):
    assert label(example, "/app?next=/admin") == "rules[3]"
    assert label(example, "/static/a.js?v=3") == "rules[0] (static)"
    assert label(example, "/public?x=/../admin") == "default"


# Methods


def test_methods_restrict_a_rule_and_compare_in_upper_case(example, tmp_path):
    assert label(example, "/static/a", method="HEAD") == "rules[0] (static)"
    assert label(example, "/static/a", method="get") == "rules[0] (static)"
    assert label(example, "/static/a", method="POST") == "default"
    single = load(tmp_path, "rules: [{match: {methods: post}, access: deny}]")
    assert access(single, "/", method="POST") == "deny"
    assert access(single, "/", method="GET") == "authenticated"


# Normalisation


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("/admin", "/admin"),
        ("/public/../admin", "/admin"),
        ("/public/..%2Fadmin", "/admin"),
        ("/public/%2e%2e/admin", "/admin"),
        ("/%61dmin", "/admin"),
        ("//admin", "/admin"),
        ("/public\\..\\admin", "/admin"),
        ("/public/%5C..%5Cadmin", "/admin"),
        ("/./admin/./", "/admin/"),
        ("/../../admin", "/admin"),
        ("/a/b/..", "/a/"),
        ("/a/.", "/a/"),
        ("/..", "/"),
        ("", "/"),
        ("/admin?x=1#y", "/admin"),
        ("/admin#frag?x", "/admin"),
        ("/%25zz", "/%zz"),  # decoded once only
        ("/caf%C3%A9", "/café"),
        ("/caf\xc3\xa9", "/café"),  # raw UTF-8 bytes, read one character per byte
        ("/.well-known/x", "/.well-known/x"),
        ("/a%20b", "/a b"),
    ],
)
def test_paths_are_decoded_once_and_normalised(raw, normalised):
    assert normalise_path(raw) == normalised


@pytest.mark.parametrize(
    "raw",
    [
        "/public/../admin",
        "/public/..%2Fadmin",
        "/public/..%2fadmin/",
        "/%61dmin",
        "//admin",
        "/public\\..\\admin",
        "/static/%2e%2e/admin/users",
        "/ADMIN/../admin",
        "/admin;jsessionid=1/users",
    ],
)
def test_traversal_tricks_that_change_the_rule_are_refused(example, raw):
    """The app may route on the path as sent or on the normalised one: when the two
    readings fall under different rules, neither is trusted (and ``//`` first is a host to
    some apps)."""
    with pytest.raises(BadRequest, match=r"ambiguous|two slashes"):
        label(example, raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/admin/x/../y", "rules[1] (admin)"),
        ("/elsewhere/%7Euser/../page", "default"),
        ("/admin/users;v=1", "rules[1] (admin)"),
        ("/caf%C3%A9", "default"),
    ],
)
def test_paths_whose_readings_agree_are_judged(example, raw, expected):
    assert label(example, raw) == expected


ISSUE_18 = """
rules:
  - {match: {path: /public}, access: public}
  - {match: {path: /admin}, access: aal2}
  - {match: {path: /internal}, access: deny}
"""


@pytest.mark.parametrize(
    "raw",
    [
        # issue 18's table: RFC 3986 and WHATWG resolve before decoding, so "a%2Fb" is one
        # segment there and both ".." climb out of /public
        "/public/a%2Fb/../../internal",
        "/public/a%2Fb/../../admin/users",
        "/public/a%2fb/../../internal?x=1",
        "/public/a\\b/../../admin",  # Java, Envoy: "\\" is no separator
        "/public/a%5Cb/../../admin",  # decoded, "\\" is "/" (IIS); encoded, a name
        "/public/x/.%2e/.%2e/admin",  # WHATWG: ".%2e" is "..", undecoded
        "/public/a//../../admin",  # merged first (nginx), or not (RFC 3986)
        "/;xa%2Fb/admin",  # Tomcat drops ";..." before decoding
        "/admin%2F..",  # Flask: decoded, not resolved
    ],
)
def test_a_path_that_any_common_reading_puts_under_another_rule_is_refused(tmp_path, raw):
    rules = load(tmp_path, ISSUE_18)
    with pytest.raises(BadRequest, match="ambiguous"):
        rules.match("GET", "app.example.com", raw)


def test_ambiguous_paths_are_refused_with_case_insensitive_paths_too(tmp_path):
    rules = load(tmp_path, "case_sensitive_paths: false\n" + ISSUE_18)
    for raw in ("/PUBLIC/a%2Fb/../../Internal", "/Public/a%2Fb/%2E%2E/%2e%2E/ADMIN/users"):
        with pytest.raises(BadRequest, match="ambiguous"):
            rules.match("GET", "app.example.com", raw)
    assert rules.match("GET", "h", "/PUBLIC/a%2Fb/../c").access is Access.PUBLIC


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/public/%252e%252e/admin", Access.PUBLIC),  # decoded once: a name "%2e%2e"
        ("/public/a%2Fb/../c", Access.PUBLIC),  # every reading stays under /public
        ("/admin/../../../admin/x", Access.AAL2),  # nothing above the root
        ("/admin/./x//y/", Access.AAL2),
        ("/x;y/../z", Access.AUTHENTICATED),
    ],
)
def test_paths_that_every_reading_puts_under_one_rule_are_judged(tmp_path, raw, expected):
    assert load(tmp_path, ISSUE_18).match("GET", "h", raw).access is expected


def test_a_plain_path_reads_one_way_and_others_every_way():
    assert path_readings("/a/b?x=/../c") == ("/a/b",)
    assert set(path_readings("/p/a%2Fb/..")) >= {"/p/a%2Fb/..", "/p/a/", "/p/", "/p/a/b/.."}
    with pytest.raises(BadRequest, match="start with /"):
        path_readings("\\admin")


def test_case_insensitive_paths_for_apps_that_route_so(tmp_path):
    rules = load(
        tmp_path,
        """
        case_sensitive_paths: false
        rules:
          - {match: {path: /admin}, access: deny}
        """,
    )
    assert rules.match("GET", "h", "/ADMIN/x").access is Access.DENY
    assert rules.match("GET", "h", "/Admin").access is Access.DENY
    assert rules.match("GET", "h", "/administrator").access is Access.AUTHENTICATED
    strict = load(tmp_path, "rules:\n  - {match: {path: /admin}, access: deny}\n")
    assert strict.match("GET", "h", "/ADMIN").access is Access.AUTHENTICATED


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("/%zz", "two hex digits"),
        ("/admin%", "two hex digits"),
        ("/admin%2", "two hex digits"),
        ("/admin%00", "control character"),
        ("/admin%0a", "control character"),
        ("/admin%7F", "control character"),
        ("/admin%C2%85", "control character"),
        ("/admin\x00", "control character"),
        ("/%C3%28", "not UTF-8"),
        ("/%FF", "not UTF-8"),
        ("/caf\u0107", "not bytes"),
        ("admin", "start with /"),
        ("/" + "a" * 9000, "longer than 8192"),
    ],
)
def test_malformed_paths_are_bad_requests(example, raw, problem):
    with pytest.raises(BadRequest, match=problem):
        normalise_path(raw)
    with pytest.raises(BadRequest, match=problem):
        example.match("GET", "app.example.com", raw)


def test_a_path_of_8192_characters_is_accepted():
    path = "/" + "a" * 8191
    assert normalise_path(path) == path


# Conditions


def view(schema_id="default", traits=None, addresses=None) -> dict:
    identity = {"id": "8f0c1a3e-0000-4000-8000-000000000001", "schema_id": schema_id}
    identity["traits"] = traits if traits is not None else {}
    if addresses is not None:
        identity["verifiable_addresses"] = addresses
    return {"session_id": "s", "identity": identity, "aal": "aal1", "authenticated_at": None}


def rule_when(tmp_path, when: str) -> Rule:
    rules = load(tmp_path, f"rules: [{{access: authenticated, when: {when}}}]")
    return rules.match("GET", "h", "/")


def test_a_rule_without_conditions_permits_every_session(example):
    assert example.match("GET", "h", "/app").permits(view()) is True
    assert example.match("GET", "h", "/nowhere").permits(view()) is True


def test_schema_id_is_one_of_the_given(tmp_path):
    one = rule_when(tmp_path, "{schema_id: admin}")
    assert one.permits(view(schema_id="admin"))
    assert not one.permits(view(schema_id="customer"))
    assert not one.permits(view(schema_id=None))
    several = rule_when(tmp_path, "{schema_id: [admin, ops]}")
    assert several.permits(view(schema_id="ops"))


def test_a_trait_equals_a_value_or_is_in_a_list(tmp_path):
    equal = rule_when(tmp_path, "{traits: {role: admin}}")
    assert equal.permits(view(traits={"role": "admin"}))
    assert not equal.permits(view(traits={"role": "user"}))
    one_of = rule_when(tmp_path, "{traits: {role: [admin, ops]}}")
    assert one_of.permits(view(traits={"role": "ops"}))
    assert not one_of.permits(view(traits={"role": "user"}))


def test_a_dotted_trait_path_reaches_into_objects(tmp_path):
    rule = rule_when(tmp_path, "{traits: {name.first: Ann}}")
    assert rule.permits(view(traits={"name": {"first": "Ann", "last": "Lee"}}))
    assert not rule.permits(view(traits={"name": {"first": "Bob"}}))
    assert not rule.permits(view(traits={"name": "Ann"}))
    assert not rule.permits(view(traits={"name.first": "Ann"}))


def test_a_missing_trait_fails_the_condition(tmp_path):
    rule = rule_when(tmp_path, "{traits: {role: admin}}")
    assert not rule.permits(view(traits={}))
    assert not rule.permits({"session_id": "s", "identity": {"id": "i"}})
    assert not rule.permits({})


def test_trait_values_compare_with_their_type(tmp_path):
    number = rule_when(tmp_path, "{traits: {level: 1}}")
    assert number.permits(view(traits={"level": 1}))
    assert number.permits(view(traits={"level": 1.0}))
    assert not number.permits(view(traits={"level": "1"}))
    assert not number.permits(view(traits={"level": True}))
    text = rule_when(tmp_path, "{traits: {level: '1'}}")
    assert text.permits(view(traits={"level": "1"}))
    assert not text.permits(view(traits={"level": 1}))
    flag = rule_when(tmp_path, "{traits: {staff: true}}")
    assert flag.permits(view(traits={"staff": True}))
    assert not flag.permits(view(traits={"staff": 1}))
    assert not flag.permits(view(traits={"staff": "true"}))


def test_a_list_trait_needs_one_matching_item_and_an_object_never_matches(tmp_path):
    rule = rule_when(tmp_path, "{traits: {role: [admin, ops]}}")
    assert rule.permits(view(traits={"role": ["viewer", "ops"]}))
    assert not rule.permits(view(traits={"role": ["viewer"]}))
    assert not rule.permits(view(traits={"role": []}))
    assert not rule.permits(view(traits={"role": [["admin"]]}))
    assert not rule.permits(view(traits={"role": {"admin": True}}))


@pytest.mark.parametrize(
    "raw", ["/public/..;/admin", "/admin;jsessionid=1", "/public;x/../admin/", "/a/..;x/admin"]
)
def test_segment_parameters_are_dropped_as_servlet_containers_do(raw):
    assert normalise_path(raw).rstrip("/") == "/admin"


def test_verified_address_true_needs_any_verified_address(tmp_path):
    rule = rule_when(tmp_path, "{verified_address: true}")
    verified_phone = {"value": "+4912345", "via": "sms", "verified": True}
    unverified_email = {"value": "a@example.com", "via": "email", "verified": False}
    assert rule.permits(view(addresses=[unverified_email, verified_phone]))
    assert not rule.permits(view(addresses=[unverified_email]))
    assert not rule.permits(view(addresses=[]))
    assert not rule.permits(view())  # no verifiable_addresses in the view at all


def test_verified_address_via_needs_a_verified_address_of_that_kind(tmp_path):
    rule = rule_when(tmp_path, "{verified_address: email}")
    email = {"value": "a@example.com", "via": "email", "verified": True}
    assert rule.permits(view(addresses=[email]))
    assert not rule.permits(view(addresses=[{**email, "via": "sms"}]))
    assert not rule.permits(view(addresses=[{**email, "verified": "true"}]))


def test_every_condition_must_hold(tmp_path):
    rule = rule_when(tmp_path, "{schema_id: admin, traits: {role: ops}, verified_address: email}")
    email = {"value": "a@example.com", "via": "email", "verified": True}
    assert rule.permits(view("admin", {"role": "ops"}, [email]))
    assert not rule.permits(view("customer", {"role": "ops"}, [email]))
    assert not rule.permits(view("admin", {"role": "dev"}, [email]))
    assert not rule.permits(view("admin", {"role": "ops"}, []))


@pytest.mark.parametrize(
    ("written", "seconds"),
    [("90s", 90), ("10m", 600), ("2h", 7200), ("1d", 86400), ("45", 45), ("'120'", 120)],
)
def test_max_age_is_a_duration_in_seconds(tmp_path, written, seconds):
    rules = load(tmp_path, f"rules: [{{access: aal2, max_age: {written}}}]")
    assert rules.match("GET", "h", "/").max_age_s == seconds


def test_max_age_is_none_when_not_given(example):
    assert example.match("GET", "h", "/app").max_age_s is None


# Mistakes in the file


@pytest.mark.parametrize(
    ("text", "where", "problem"),
    [
        ("rules: [{access: allow}]", "rules[0].access", "'allow' is not one of public, auth"),
        ("rules: [{match: {path: /x}}]", "rules[0].access", "is required"),
        ("rules: [{access: public}, {acess: public}]", "rules[1]", "unknown field 'acess'"),
        ("rules: [{access: public, match: {paths: /x}}]", "rules[0].match", "unknown field"),
        (
            "rules: [{access: public}, {access: public}, {match: {path: admin}, access: deny}]",
            "rules[2].match.path",
            "'admin' must start with /",
        ),
        ("rules: [{match: {path: [/a, 5]}, access: deny}]", "rules[0].match.path[1]", "5 is"),
        ("rules: [{match: {path: []}, access: deny}]", "rules[0].match.path", "non-empty list"),
        ("rules: [{match: {path: /a//b}, access: deny}]", "rules[0].match.path", "never match"),
        ("rules: [{match: {path: /a/../b}, access: deny}]", "rules[0].match.path", "'/b'"),
        ("rules: [{match: {path: /a%2Fb}, access: deny}]", "rules[0].match.path", "%"),
        ("rules: [{match: {path: '/a?b'}, access: deny}]", "rules[0].match.path", "query"),
        ("rules: [{match: {path: '/a/**/b/**'}, access: deny}]", "rules[0].match.path", "**"),
        ("rules: [{match: {path: '/a**'}, access: deny}]", "rules[0].match.path", "whole"),
        ("rules: [{match: {path: '/x/*-*'}, access: deny}]", "rules[0].match.path", "one *"),
        ("rules: [{match: {host: 'a.*.b.com'}, access: deny}]", "rules[0].match.host", "*."),
        ("rules: [{match: {host: 'a.com:8443'}, access: deny}]", "rules[0].match.host", "port"),
        ("rules: [{match: {host: 'a b.com'}, access: deny}]", "rules[0].match.host", "host"),
        (
            "rules: [{match: {methods: [GET, 'G T']}, access: deny}]",
            "rules[0].match.methods[1]",
            "",
        ),
        ("rules: [{match: [/x], access: deny}]", "rules[0].match", "must be a mapping"),
        (
            "rules: [{access: public}, {access: public}, {access: public}, "
            "{access: public, max_age: 10m}]",
            "rules[3].max_age",
            "only for access authenticated or aal2",
        ),
        ("rules: [{access: deny, when: {schema_id: a}}]", "rules[0].when", "only for access"),
        ("rules: [{access: aal2, max_age: 10 minutes}]", "rules[0].max_age", "not a duration"),
        ("rules: [{access: aal2, max_age: 0}]", "rules[0].max_age", "above 0"),
        ("rules: [{access: aal2, max_age: 1.5}]", "rules[0].max_age", "not a duration"),
        ("rules: [{access: aal2, when: {schema: a}}]", "rules[0].when", "unknown field 'schema'"),
        ("rules: [{access: aal2, when: {}}]", "rules[0].when", "one or more"),
        ("rules: [{access: aal2, when: {traits: {role: []}}}]", "rules[0].when.traits.role", ""),
        (
            "rules: [{access: aal2, when: {traits: {born: 2001-02-03}}}]",
            "rules[0].when.traits.born",
            "quote dates",
        ),
        ("rules: [{access: aal2, when: {traits: {a..b: x}}}]", "rules[0].when.traits", "dotted"),
        (
            "rules: [{access: aal2, when: {verified_address: false}}]",
            "rules[0].when.verified_address",
            "not true or a via",
        ),
        ("rules: [{id: a, access: public}, {id: a, access: deny}]", "rules[1].id", "rules[0]"),
        ("rules: [{id: 'has space', access: public}]", "rules[0].id", "is not 1-64"),
        ("rules: [just a string]", "rules[0]", "must be a mapping"),
        ("rules: {access: public}", "rules", "must be a list"),
        ("default: allow", "default", "'allow' is not one of"),
        ("rule: []", "rule", "unknown top-level key"),
    ],
)
def test_every_mistake_names_the_rule_and_field(tmp_path, text, where, problem):
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    assert caught.value.key == "BRIDGE_RULES_FILE"
    assert caught.value.problem.startswith(f"{where}: ")
    assert problem in caught.value.problem


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot be read"),
        ("rules: [", "is not valid YAML"),
        (b"rules: [\xff]", "is not valid YAML"),
        ("- access: public", "must be a mapping"),
        ("", "is empty"),
    ],
)
def test_an_unusable_file_is_named(tmp_path, content, problem):
    path = tmp_path / "rules.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        Rules.load(path)
    assert caught.value.key == "BRIDGE_RULES_FILE"
    assert caught.value.problem.startswith(str(path))
    assert problem in caught.value.problem


def test_describe_lists_each_rule_and_the_default(example):
    assert example.describe() == [
        "rules[0] (static): methods GET HEAD; host app.example.com *.cdn.example.com; "
        "path /static/ /favicon.ico -> public",
        "rules[1] (admin): path /admin/** -> aal2, a login within 600s, when schema_id in admin",
        "rules[2] (export): path /api/*/export -> deny",
        "rules[3]: path /app -> authenticated",
        "default -> deny",
    ]
    assert example.match("GET", "h", "/admin/x").describe() == example.describe()[1]


def test_the_default_rule_is_at_hand(example):
    assert example.default.label == "default"
    assert example.default.access is Access.DENY
    assert example.match("GET", "h", "/nowhere") is example.default
    assert Rules.everything_authenticated().default.access is Access.AUTHENTICATED


# Memo


REQUESTS = [
    ("GET", "app.example.com", "/static/a.css"),
    ("POST", "app.example.com", "/static/a.css"),
    ("GET", "eu.cdn.example.com:443", "/favicon.ico"),
    ("GET", "other.test", "/static/a.css"),
    ("GET", "h", "/admin"),
    ("GET", "h", "/admin/x/../y"),
    ("GET", "h", "/api/1/export"),
    ("GET", "h", "/app?x=1"),
    ("GET", "h", "/app?y=2"),
    ("GET", "h", "/elsewhere"),
]


def test_a_remembered_answer_is_the_answer(tmp_path):
    fresh = [load(tmp_path, EXAMPLE).match(*request) for request in REQUESTS]
    rules = load(tmp_path, EXAMPLE)
    first = [rules.match(*request) for request in REQUESTS]
    again = [rules.match(*request) for request in REQUESTS]
    assert [rule.label for rule in first] == [rule.label for rule in fresh]
    assert all(a is b for a, b in zip(first, again, strict=True))
    assert [rule.label for rule in first] == [
        "rules[0] (static)",
        "default",
        "rules[0] (static)",
        "default",
        "rules[1] (admin)",
        "rules[1] (admin)",
        "rules[2] (export)",
        "rules[3]",
        "rules[3]",
        "default",
    ]


def test_a_repeated_request_is_answered_from_memory(example, monkeypatch):
    judged: list[str] = []

    def counting(raw: str) -> tuple[str, ...]:
        judged.append(raw)
        return path_readings(raw)

    monkeypatch.setattr("bridge.pipeline.rules.path_readings", counting)
    for _ in range(3):
        assert label(example, "/app/x?page=1") == "rules[3]"
        assert label(example, "/app/x?page=2") == "rules[3]"
    assert judged == ["/app/x"]
    assert label(example, "/app/x", method="POST") == "rules[3]"
    assert label(example, "/app/x", host="other.test") == "rules[3]"
    assert judged == ["/app/x"] * 3


def test_answers_stay_right_when_the_memo_fills_and_is_dropped(example):
    for number in range(12_000):
        assert label(example, f"/app/{number}") == "rules[3]"
        assert label(example, f"/admin/{number}", host=f"h{number}") == "rules[1] (admin)"
    assert label(example, "/static/a", method="POST") == "default"


def test_a_bad_path_is_refused_every_time(example):
    for _ in range(3):
        with pytest.raises(BadRequest):
            example.match("GET", "h", "/%zz")


def test_concurrent_callers_get_the_same_answers(tmp_path):
    rules = load(tmp_path, EXAMPLE)
    expected = [load(tmp_path, EXAMPLE).match(*request).label for request in REQUESTS]
    wrong: list[tuple] = []

    def call() -> None:
        # A new port each round is a new request to remember, and the same answer.
        for port in range(1, 1500):
            for request, want in zip(REQUESTS, expected, strict=True):
                method, host, path = request
                got = rules.match(method, f"{host.partition(':')[0]}:{port}", path)
                if got.label != want:
                    wrong.append((request, port, got.label))

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


# The JWT's audience per rule


def test_a_rule_may_name_the_jwt_audience_of_its_requests(tmp_path):
    rules = load(
        tmp_path,
        """
        rules:
          - id: shop
            match: {host: shop.example.com}
            access: authenticated
            jwt_audience: shop
          - match: {path: /public/}
            access: public
            jwt_audience: "https://blog.example.com"
          - match: {path: /other}
            access: aal2
        """,
    )
    assert rules.match("GET", "shop.example.com", "/cart").jwt_audience == "shop"
    assert rules.match("GET", "blog", "/public/x").jwt_audience == "https://blog.example.com"
    assert rules.match("GET", "blog", "/other").jwt_audience is None  # BRIDGE_JWT_AUDIENCE
    assert rules.default.jwt_audience is None
    assert rules.jwt_audiences == {
        "rules[0] (shop)": "shop",
        "rules[1]": "https://blog.example.com",
    }
    assert (
        rules.describe()[0]
        == "rules[0] (shop): host shop.example.com -> authenticated; JWT aud shop"
    )


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("rules: [{access: deny, jwt_audience: a}]", "not for access deny"),
        ("rules: [{access: public, jwt_audience: ''}]", "is not 1-256 visible ASCII"),
        ("rules: [{access: public, jwt_audience: 'a b'}]", "is not 1-256 visible ASCII"),
        ("rules: [{access: public, jwt_audience: 42}]", "is not 1-256 visible ASCII"),
        ("rules: [{access: public, jwt_audience: [a, b]}]", "is not 1-256 visible ASCII"),
        (f"rules: [{{access: public, jwt_audience: {'a' * 257}}}]", "is not 1-256 visible"),
    ],
)
def test_a_bad_jwt_audience_is_named(tmp_path, text, problem):
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    assert caught.value.key == "BRIDGE_RULES_FILE"
    assert caught.value.problem.startswith("rules[0].jwt_audience: ")
    assert problem in caught.value.problem


@pytest.mark.parametrize("raw", ["//x/internal", "/\\x/internal", "///internal", "//x%2Finternal"])
def test_a_path_starting_with_two_slashes_is_refused(tmp_path, raw):
    """``new URL(req.url, base)`` (Node's docs) reads ``//x/internal`` as the path
    ``/internal`` on the host ``x``: with ``/`` public, every reading of the path itself
    would have said public."""
    rules = load(
        tmp_path,
        "rules:\n  - {match: {path: /internal}, access: deny}\n"
        "  - {match: {path: /}, access: public}\n",
    )
    with pytest.raises(BadRequest, match="two slashes"):
        rules.match("GET", "app.example.com", raw)
    assert rules.match("GET", "app.example.com", "/x//internal").access is Access.PUBLIC
