import hashlib

import pytest

from fleetkit.core.errors import UnitError
from fleetkit.core.unitfile import MAX_LINE_BYTES, Option, UnitFile, parse_unit_file

SIMPLE = """\
[Unit]
Description=Hello
After=network.target

[Service]
ExecStart=/bin/sleep 3600
"""


def test_parse_keeps_sections_and_repeated_keys_in_order():
    text = (
        "[Unit]\nDescription=d\n[Service]\nExecStartPre=/bin/a\nExecStartPre=/bin/b\n"
        "ExecStart=/bin/c\n[X-Fleet]\nMachineMetadata=a=1\nMachineMetadata=a=2\n"
    )
    unit_file = parse_unit_file(text)

    assert unit_file.sections() == ["Unit", "Service", "X-Fleet"]
    assert unit_file.values("Service", "ExecStartPre") == ["/bin/a", "/bin/b"]
    assert unit_file.values("X-Fleet", "MachineMetadata") == ["a=1", "a=2"]
    assert unit_file.options[0] == Option("Unit", "Description", "d")
    section, key, value = unit_file.options[-1]
    assert (section, key, value) == ("X-Fleet", "MachineMetadata", "a=2")


def test_serialize_merges_repeated_section_into_first_occurrence():
    unit_file = parse_unit_file("[Unit]\nA=1\n[Service]\nB=2\n[Unit]\nC=3\n")

    assert unit_file.serialize() == "[Unit]\nA=1\nC=3\n\n[Service]\nB=2\n"
    assert unit_file.sections() == ["Unit", "Service"]


def test_serialize_normal_form_matches_fleet_layout():
    assert parse_unit_file(SIMPLE).serialize() == SIMPLE


def test_serialize_keeps_section_without_options():
    unit_file = parse_unit_file("[Unit]\n\n[Install]\n")

    assert unit_file.sections() == ["Unit", "Install"]
    assert unit_file.serialize() == "[Unit]\n\n[Install]\n"


def test_parse_backslash_continuation_joins_with_single_space():
    text = "[Service]\nExecStart=/bin/sh -c \\\n    'echo a; \\\n\t echo b'\nUser=x\n"

    unit_file = parse_unit_file(text)

    assert unit_file.value("Service", "ExecStart") == "/bin/sh -c 'echo a; echo b'"
    assert unit_file.value("Service", "User") == "x"


def test_parse_continuation_ends_at_blank_line_and_end_of_file():
    unit_file = parse_unit_file("[Service]\nA=one \\\n\nB=two \\")

    assert unit_file.values("Service", "A") == ["one"]
    assert unit_file.values("Service", "B") == ["two"]


def test_parse_continuation_skips_comment_lines():
    unit_file = parse_unit_file("[Service]\nA=one \\\n# note\n  two\n")

    assert unit_file.value("Service", "A") == "one two"


def test_parse_comments_only_at_line_start():
    text = "# top\n; also\n[Service]\n   # indented comment\n\t; indented\nExecStart=/bin/echo #not a comment\n"

    unit_file = parse_unit_file(text)

    assert unit_file.options == (Option("Service", "ExecStart", "/bin/echo #not a comment"),)


def test_parse_trims_odd_whitespace_around_key_equals_and_value():
    unit_file = parse_unit_file("  [ Service ]  \n \t ExecStart \t=\t /bin/true  \nUser =x\n")

    assert unit_file.options == (
        Option("Service", "ExecStart", "/bin/true"),
        Option("Service", "User", "x"),
    )


def test_parse_keeps_equals_signs_inside_the_value():
    assert parse_unit_file("[Service]\nEnvironment=A=1 B=2\n").value(
        "Service", "Environment"
    ) == "A=1 B=2"


def test_parse_empty_value_is_an_option():
    unit_file = parse_unit_file("[Service]\nEnvironment=\n")

    assert unit_file.options == (Option("Service", "Environment", ""),)
    assert unit_file.serialize() == "[Service]\nEnvironment=\n"


def test_parse_crlf_gives_same_result_as_lf():
    assert parse_unit_file(SIMPLE.replace("\n", "\r\n")) == parse_unit_file(SIMPLE)


def test_parse_ignores_byte_order_mark():
    assert parse_unit_file("\ufeff" + SIMPLE) == parse_unit_file(SIMPLE)


def test_value_returns_last_and_default():
    unit_file = parse_unit_file("[Service]\nUser=a\nUser=b\n")

    assert unit_file.value("Service", "User") == "b"
    assert unit_file.value("Service", "Group") is None
    assert unit_file.value("Service", "Group", "root") == "root"
    assert unit_file.value("service", "User") is None  # names are case-sensitive


def test_description_is_first_unit_description():
    assert parse_unit_file("[Unit]\nDescription=one\nDescription=two\n").description() == "one"
    assert parse_unit_file("[Service]\nDescription=x\n").description() == ""


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("[Service]\nExecStart=/bin/true\n\nExecStart /bin/true\n", 4, 'add the "="'),
        ("# comment\nExecStart=/bin/true\n", 2, "before any section header"),
        ("[Unit]\n[Service] ExecStart=/bin/true\n", 2, 'text after "]"'),
        ("[Unit]\n=value\n", 2, 'no key before "="'),
        ("[Unit]\nA=1\n[Service\n", 3, 'no closing "]"'),
        ("[Unit]\n[]\n", 2, "no name"),
        ("[Unit]\nA=1 \\\n  b\nbroken\n", 4, 'expected "Key=Value"'),
    ],
)
def test_parse_rejects_malformed_line_naming_its_number(text, line, fragment):
    with pytest.raises(UnitError) as info:
        parse_unit_file(text)

    assert str(info.value).startswith(f"line {line}: ")
    assert fragment in str(info.value)


def test_parse_error_quotes_the_offending_line():
    with pytest.raises(UnitError, match='got "ExecStart /bin/true"'):
        parse_unit_file("[Unit]\nDescription=x\n\nExecStart /bin/true\n")


def test_parse_rejects_line_over_2048_bytes():
    ok = "[Service]\nA=" + "x" * (MAX_LINE_BYTES - 2) + "\n"
    too_long = "[Service]\nB=1\nA=" + "\u00e9" * MAX_LINE_BYTES + "\n"  # 2 bytes a character

    assert len(parse_unit_file(ok).value("Service", "A")) == MAX_LINE_BYTES - 2
    with pytest.raises(UnitError, match=r"^line 3: line is 4098 bytes long"):
        parse_unit_file(too_long)


@pytest.mark.parametrize("text", ["", "  \n\n", "\r\n"])
def test_parse_rejects_empty_file(text):
    with pytest.raises(UnitError, match="empty"):
        parse_unit_file(text)


def test_parse_rejects_file_without_section_header():
    with pytest.raises(UnitError, match="no section header"):
        parse_unit_file("# only a comment\n; and another\n")


def test_hash_is_sha1_hex_of_normal_form():
    unit_file = parse_unit_file(SIMPLE)

    assert unit_file.hash() == hashlib.sha1(SIMPLE.encode()).hexdigest()
    assert len(unit_file.hash()) == 40


def test_hash_ignores_comments_blank_lines_and_whitespace():
    noisy = (
        "# header comment\n\n[Unit]\n  Description =  Hello\n; note\nAfter=network.target\n\n\n"
        "[Service]\r\n\tExecStart= /bin/sleep 3600   \r\n"
    )

    assert parse_unit_file(noisy).hash() == parse_unit_file(SIMPLE).hash()


def test_hash_changes_with_option_order():
    swapped = SIMPLE.replace("Description=Hello\nAfter=network.target", "After=network.target\nDescription=Hello")

    assert parse_unit_file(swapped).hash() != parse_unit_file(SIMPLE).hash()


def test_serialize_then_parse_is_identity():
    text = "[Unit]\nDescription=a \\\n b\n[Service]\nEnvironment=\nExecStart=/bin/echo ; x # y\n"
    unit_file = parse_unit_file(text)

    assert parse_unit_file(unit_file.serialize()) == unit_file


def test_serialize_is_stable_after_merging_sections():
    unit_file = parse_unit_file("[Unit]\nA=1\n[Service]\nB=2\n[Unit]\nC=3\n")

    again = parse_unit_file(unit_file.serialize())

    assert again.serialize() == unit_file.serialize()
    assert again.hash() == unit_file.hash()


def test_unit_file_built_from_options_lists_their_sections():
    unit_file = UnitFile((("Service", "ExecStart", "/bin/true"), Option("Unit", "After", "x")))

    assert unit_file.sections() == ["Service", "Unit"]
    assert unit_file.serialize() == "[Service]\nExecStart=/bin/true\n\n[Unit]\nAfter=x\n"
