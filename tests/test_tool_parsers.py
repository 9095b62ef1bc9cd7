"""The incremental tool-call parsers (`workers.tools.formats`) on outputs written the way models
write them: the same text, calls and arguments whatever pieces the output streams in, arguments
that are exactly the model's JSON, and syntax errors (truncated or malformed calls) raised by
`close()` without a nameless call ever being announced.
"""

from __future__ import annotations

import codecs

import json
import random
from dataclasses import dataclass, field

import pytest

from workers.tools.events import Arguments, CallStarted, Text, ToolCallParser, ToolSyntaxError
from workers.tools.formats import PARSERS, detect_format
from workers.tools.formats.generic import GenericParser
from workers.tools.formats.hermes import HermesParser
from workers.tools.formats.json import PlainJsonParser
from workers.tools.formats.llama3 import Llama3Parser
from workers.tools.formats.mistral import MistralParser
from workers.tools.json_scan import JsonScanner, JsonStringDecoder

pytestmark = pytest.mark.unit


@dataclass
class Parsed:
    """What a whole stream of events adds up to."""

    text: str = ""
    calls: list[tuple[str, str]] = field(default_factory=list)  # (name, concatenated arguments)


def check_feed_events(events: list, parsed: Parsed) -> None:
    """Add one feed's events to `parsed`, checking the vocabulary's promises on the way."""
    arguments_seen: set[int] = set()
    previous = None
    for event in events:
        if isinstance(event, Text):
            assert event.text, "an empty Text event"
            assert not isinstance(previous, Text), "two Text events in a row"
            parsed.text += event.text
        elif isinstance(event, CallStarted):
            assert event.index == len(parsed.calls), "calls numbered out of order"
            assert isinstance(event.name, str) and event.name, "a call started without a name"
            parsed.calls.append((event.name, ""))
        else:
            assert isinstance(event, Arguments)
            assert event.index == len(parsed.calls) - 1, "arguments for a call that is not the current one"
            assert event.text, "an empty Arguments event"
            assert event.index not in arguments_seen, "more than one Arguments event per call in one feed"
            arguments_seen.add(event.index)
            name, arguments = parsed.calls[event.index]
            parsed.calls[event.index] = (name, arguments + event.text)
        previous = event


def parse(parser_class: type[ToolCallParser], pieces: list[str]) -> Parsed:
    parser = parser_class()
    parsed = Parsed()
    for piece in pieces:
        check_feed_events(parser.feed(piece), parsed)
    check_feed_events(parser.close(), parsed)
    return parsed


def splittings(output: str, seed: int = 0):
    """The output whole, cut in two at every character boundary, in 1-character pieces, and in
    random pieces (as a tokenizer might cut it)."""
    yield [output]
    for cut in range(len(output) + 1):
        yield [output[:cut], output[cut:]]
    yield list(output)
    generator = random.Random(seed)
    for _ in range(20):
        pieces, start = [], 0
        while start < len(output):
            end = start + generator.randint(1, 7)
            pieces.append(output[start:end])
            start = end
        yield pieces


def raw_arguments(output: str) -> list[str]:
    """The raw text of every arguments object in `output` (after `"arguments":`, `"parameters":` or
    Mistral's `[ARGS]`), in order."""
    decoder = json.JSONDecoder()
    found = []
    position = 0
    while True:
        hits = [(output.find(marker, position), marker) for marker in ('"arguments"', '"parameters"', "[ARGS]")]
        hits = [(hit, marker) for hit, marker in hits if hit >= 0]
        if not hits:
            return found
        hit, marker = min(hits)
        start = output.index("{", hit + len(marker))
        _, end = decoder.raw_decode(output, start)
        found.append(output[start:end])
        position = end


# Outputs as the models write them.

QWEN_TWO_CALLS = (
    "I'll check the weather in both cities and search your notes.\n"
    "<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius", "note": "naïve café ☕"}}\n'
    "</tool_call>\n"
    "<tool_call>\n"
    '{"name": "search_notes", "arguments": {"query": "text with </tool_call> and <tool_call> {braces} '
    'and \\"quotes\\" and a backslash \\\\", "filters": {"tags": ["work", "2024"], "limit": 5, '
    '"nested": {"deep": [1, {"x": null, "y": [true, false]}], "emoji": "\\ud83d\\ude00 😀"}}}}\n'
    "</tool_call>"
)
QWEN_CALLS = [("get_weather", None), ("search_notes", None)]

GENERIC_CALLS = json.dumps(
    {
        "tool_calls": [
            {"name": "get_weather", "arguments": {"city": "São Paulo", "days": [1, 2, 3]}},
            {"name": "run_query", "arguments": {"sql": 'SELECT "}" FROM t WHERE a = \'{\'', "opts": {"a": {}}}},
        ]
    },
    indent=2,
    ensure_ascii=False,
)
GENERIC_COMPACT = '{"tool_calls":[{"name":"ping","arguments":{}},{"name":"echo","arguments":{"s":"\\\\\\""}}]}'
GENERIC_RESPONSE_TEXT = 'Line one\nTab\there, "quoted", back\\slash, /slash, \b\f\r, é, 😀, 中文.'
GENERIC_RESPONSE = '{ "response" : ' + json.dumps(GENERIC_RESPONSE_TEXT) + " }\n"
GENERIC_RESPONSE_ESCAPED = (
    '{"response": "caf\\u00e9 \\ud83d\\ude00 \\/ \\" \\\\ \\n end"}'  # every escape, a surrogate pair
)

LLAMA_TWO_CALLS = (
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
    '{"name": "get_time", "arguments": {"timezone": "Europe/Paris", "format": {"24h": true}}}'
)
LLAMA_ONE_CALL = '{"name": "lookup", "parameters": {"q": "what is {this}; and \\"that\\"?"}}'

MISTRAL_ARRAY = (
    'Sure, let me call both.[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, '
    '"id": "a1b2c3d4e"}, {"name": "get_time", "arguments": {"tz": "[TOOL_CALLS] ] }"}, "id": "f5g6h7i8j"}]'
)
MISTRAL_NAMED = (
    '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": [1, 2]}'
    '[TOOL_CALLS]get_time[CALL_ID]abc123456[ARGS]{"tz": "CET"}'
)

JSON_OBJECT = '{"name": "get_weather", "arguments": {"city": "Zürich", "list": [{"a": "}"}]}}'
JSON_ARRAY = '  [{"name": "a", "parameters": {"x": 1}}, {"name": "b", "arguments": {"y": "[\\"z\\"]"}}]\n'
JSON_FENCED = '```json\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n```\n'

# (parser, output, expected text, expected call names); each call's arguments are checked
# against the raw text of the output's "arguments" / "parameters" objects
CASES = {
    "hermes two calls": (HermesParser, QWEN_TWO_CALLS, "I'll check the weather in both cities and search your notes.",
                         ["get_weather", "search_notes"]),
    "hermes text only": (HermesParser, "Hello! <b>bold</b> and a < sign, <tool_ not a tag.\n",
                         "Hello! <b>bold</b> and a < sign, <tool_ not a tag.\n", []),
    "hermes ends on a partial tag": (HermesParser, "Almost <tool_c", "Almost <tool_c", []),
    "hermes text after calls": (
        HermesParser,
        '\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n\nDone, see above.  ',
        "Done, see above.  ",
        ["f"],
    ),
    "hermes no closing tag at the end": (
        HermesParser, '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n', "", ["f"]
    ),
    "hermes arguments before name": (
        HermesParser,
        '<tool_call>{"arguments": {"a": [1, 2]}, "name": "g"}</tool_call><tool_call>{"name": "h"}</tool_call>',
        "",
        ["g", "h"],
    ),
    "generic calls": (GenericParser, GENERIC_CALLS, "", ["get_weather", "run_query"]),
    "generic compact": (GenericParser, GENERIC_COMPACT, "", ["ping", "echo"]),
    "generic response": (GenericParser, GENERIC_RESPONSE, GENERIC_RESPONSE_TEXT, []),
    "generic escapes": (GenericParser, GENERIC_RESPONSE_ESCAPED, 'café 😀 / " \\ \n end', []),
    "generic empty response": (GenericParser, '{"response": ""}', "", []),
    "llama3 two calls": (Llama3Parser, LLAMA_TWO_CALLS, "", ["get_weather", "get_time"]),
    "llama3 one call": (Llama3Parser, "\n" + LLAMA_ONE_CALL + ";\n", "", ["lookup"]),
    "llama3 text": (Llama3Parser, "  The capital of France is Paris {not a call}.",
                    "  The capital of France is Paris {not a call}.", []),
    "llama3 text starting like the tag": (Llama3Parser, "<|python", "<|python", []),
    "mistral array": (MistralParser, MISTRAL_ARRAY, "Sure, let me call both.", ["get_weather", "get_time"]),
    "mistral named": (MistralParser, MISTRAL_NAMED, "", ["get_weather", "get_time"]),
    "mistral text only": (MistralParser, "See [1] and [TOOL", "See [1] and [TOOL", []),
    "json object": (PlainJsonParser, JSON_OBJECT, "", ["get_weather"]),
    "json array": (PlainJsonParser, JSON_ARRAY, "", ["a", "b"]),
    "json fenced": (PlainJsonParser, JSON_FENCED, "", ["get_weather"]),
    "json objects in a row": (PlainJsonParser, JSON_OBJECT + "\n" + JSON_OBJECT, "", ["get_weather", "get_weather"]),
    "json text": (PlainJsonParser, "\nThe answer is 42.", "\nThe answer is 42.", []),
    "json answer that is not a call": (PlainJsonParser, '{"answer": 4, "name": "x"}', '{"answer": 4, "name": "x"}', []),
    "json array that is not calls": (PlainJsonParser, "[1, 2, 3]", "[1, 2, 3]", []),
    "json cut before its first key": (PlainJsonParser, '[{"na', '[{"na', []),
    "json other fence": (PlainJsonParser, '```python\n{"name": "f"}\n```', '```python\n{"name": "f"}\n```', []),
}


@pytest.mark.parametrize("case", CASES)
def test_whole_output(case):
    parser_class, output, text, names = CASES[case]
    parsed = parse(parser_class, [output])
    assert parsed.text == text
    assert [name for name, _ in parsed.calls] == names
    expected_arguments = raw_arguments(output) if names else []
    for (_, arguments), expected in zip(parsed.calls, expected_arguments + ["{}"] * len(names)):
        assert arguments == expected  # the model's text, whitespace and escapes as written
        assert isinstance(json.loads(arguments), dict)


@pytest.mark.parametrize("case", CASES)
def test_every_splitting_gives_the_same_result(case):
    parser_class, output, _, _ = CASES[case]
    whole = parse(parser_class, [output])
    for pieces in splittings(output, seed=len(case)):
        assert parse(parser_class, pieces) == whole, pieces


@pytest.mark.parametrize("case", CASES)
def test_every_byte_boundary_gives_the_same_result(case):
    """Token pieces split UTF-8 anywhere; the backend's incremental decoder (as in
    `workers.backends.llama_cpp.Generation`) holds a split character back, then the parser sees text."""
    parser_class, output, _, _ = CASES[case]
    whole = parse(parser_class, [output])
    data = output.encode("utf-8")
    for cut in range(1, len(data)):
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces = [decoder.decode(data[:cut]), decoder.decode(data[cut:]), decoder.decode(b"", final=True)]
        assert parse(parser_class, pieces) == whole, cut
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    assert parse(parser_class, [decoder.decode(bytes([b])) for b in data]) == whole


def test_arguments_are_one_event_per_call_per_feed():
    events = GenericParser().feed(GENERIC_CALLS)
    assert [type(event) for event in events] == [CallStarted, Arguments, CallStarted, Arguments]
    events = HermesParser().feed(QWEN_TWO_CALLS)
    assert [type(event) for event in events] == [Text, CallStarted, Arguments, CallStarted, Arguments]


def test_hermes_holds_back_what_may_be_a_tag():
    parser = HermesParser()
    assert parser.feed("Let me check ") == [Text("Let me check")]
    assert parser.feed("<tool_c") == []
    assert parser.feed("all>\n") == []
    assert parser.feed('{"name": "get_weather", ') == [CallStarted(0, "get_weather")]
    assert parser.feed('"arguments": {"city": ') == [Arguments(0, '{"city": ')]
    assert parser.feed('"Paris"}}\n</tool_') == [Arguments(0, '"Paris"}')]
    assert parser.feed("call>\n") == []
    assert parser.close() == []


def test_hermes_text_resumes_when_the_tag_does_not_come():
    parser = HermesParser()
    assert parser.feed("a <tool_c") == [Text("a")]
    assert parser.feed("ar> b") == [Text(" <tool_car> b")]


def test_generic_streams_the_response_and_never_half_an_escape():
    parser = GenericParser()
    assert parser.feed('{"response": "Hel') == [Text("Hel")]
    assert parser.feed("lo \\") == [Text("lo ")]
    assert parser.feed("u00") == []
    assert parser.feed("e9 \\ud83d") == [Text("é ")]
    assert parser.feed("\\ude00!") == [Text("😀!")]
    assert parser.feed('"}') == []
    assert parser.close() == []


def test_generic_announces_a_call_once_its_name_is_complete():
    parser = GenericParser()
    assert parser.feed('{"tool_calls": [{"name": "get_wea') == []
    assert parser.feed('ther"') == [CallStarted(0, "get_weather")]
    assert parser.feed(', "arguments": {"a"') == [Arguments(0, '{"a"')]
    assert parser.feed(": 1}}]}") == [Arguments(0, ": 1}")]
    assert parser.close() == []


def test_llama3_decides_text_at_the_first_character():
    parser = Llama3Parser()
    assert parser.feed("  ") == []
    assert parser.feed("Hi") == [Text("  Hi")]
    assert parser.feed(" {there}") == [Text(" {there}")]


def test_mistral_holds_back_a_partial_marker():
    parser = MistralParser()
    assert parser.feed("Sure [TOOL_") == [Text("Sure")]
    assert parser.feed("CALLS]get_weather[AR") == []
    assert parser.feed('GS]{"city"') == [CallStarted(0, "get_weather"), Arguments(0, '{"city"')]


def test_plain_json_waits_for_the_first_key():
    parser = PlainJsonParser()
    assert parser.feed('{"na') == []
    assert parser.feed('me": "f", "arguments": {}}') == [CallStarted(0, "f"), Arguments(0, "{}")]
    parser = PlainJsonParser()
    assert parser.feed('{"ans') == []
    assert parser.feed('wer": 1}') == [Text('{"answer": 1}')]


MALFORMED = {
    "generic empty": (GenericParser, ""),
    "generic plain text": (GenericParser, "Hello"),
    "generic unknown key": (GenericParser, '{"other": 1}'),
    "generic trailing comma in arguments": (GenericParser, '{"tool_calls": [{"name": "f", "arguments": {"a": 1,}}]}'),
    "generic mismatched brackets": (GenericParser, '{"tool_calls": [{"name": "f", "arguments": {"a": [1}}]}'),
    "generic no name": (GenericParser, '{"tool_calls": [{"arguments": {}}]}'),
    "generic empty name": (GenericParser, '{"tool_calls": [{"name": "", "arguments": {}}]}'),
    "generic name not a string": (GenericParser, '{"tool_calls": [{"name": 3, "arguments": {}}]}'),
    "generic arguments not an object": (GenericParser, '{"tool_calls": [{"name": "f", "arguments": [1]}]}'),
    "generic arguments as a string": (GenericParser, '{"tool_calls": [{"name": "f", "arguments": "{}"}]}'),
    "generic two names": (GenericParser, '{"tool_calls": [{"name": "f", "name": "g", "arguments": {}}]}'),
    "generic empty call": (GenericParser, '{"tool_calls": [{}]}'),
    "generic text after": (GenericParser, '{"response": "hi"} and more'),
    "generic invalid escape": (GenericParser, '{"response": "bad \\x escape"}'),
    "generic invalid unicode escape": (GenericParser, '{"response": "bad \\u12G4"}'),
    "generic unterminated response": (GenericParser, '{"response": "cut off by the token li'),
    "generic response not a string": (GenericParser, '{"response": 42}'),
    "generic missing comma": (GenericParser, '{"tool_calls": [{"name": "f" "arguments": {}}]}'),
    "hermes not json": (HermesParser, "<tool_call>\nget_weather(city='Paris')\n</tool_call>"),
    "hermes junk before closing tag": (HermesParser, '<tool_call>{"name": "f", "arguments": {}} junk</tool_call>'),
    "hermes open tag at the end": (HermesParser, "Calling it now.\n<tool_call>\n"),
    "hermes invalid arguments": (HermesParser, '<tool_call>{"name": "f", "arguments": {"a": tru}}</tool_call>'),
    "llama3 junk after call": (Llama3Parser, '{"name": "f", "parameters": {"a": 1}} then text'),
    "llama3 no name": (Llama3Parser, '{"parameters": {"a": 1}}'),
    "llama3 parameters not an object": (Llama3Parser, '{"name": "f", "parameters": "x"}'),
    "llama3 not a call": (Llama3Parser, '{"answer": 42}'),
    "mistral unclosed array": (MistralParser, '[TOOL_CALLS][{"name": "f", "arguments": {}}'),
    "mistral named cut off": (MistralParser, '[TOOL_CALLS]f[ARGS]{"a": '),
    "mistral name with a space": (MistralParser, "[TOOL_CALLS]get weather[ARGS]{}"),
    "mistral no args marker": (MistralParser, "[TOOL_CALLS]get_weather"),
    "mistral text after calls": (MistralParser, '[TOOL_CALLS][{"name": "f", "arguments": {}}] and then text'),
    "mistral marker at the end": (MistralParser, "Calling: [TOOL_CALLS]"),
    "json truncated": (PlainJsonParser, '{"name": "f", "arguments": {"a": 1}'),
    "json text after the call": (PlainJsonParser, '{"name": "f", "arguments": {}} is what I would call'),
    "json array with a number": (PlainJsonParser, '[{"name": "f", "arguments": {}}, 3]'),
}


def assert_raises_on_close(parser_class: type[ToolCallParser], pieces: list[str]) -> None:
    parser = parser_class()
    parsed = Parsed()
    for piece in pieces:
        check_feed_events(parser.feed(piece), parsed)  # never a nameless CallStarted, among others
    with pytest.raises(ToolSyntaxError):
        parser.close()


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_output_raises_on_close(case):
    parser_class, output = MALFORMED[case]
    for pieces in [[output], list(output), *([output[:cut], output[cut:]] for cut in range(len(output) + 1))]:
        assert_raises_on_close(parser_class, pieces)


TRUNCATABLE = {
    "generic": (GenericParser, GENERIC_CALLS),
    "generic response": (GenericParser, GENERIC_RESPONSE),
    "hermes": (HermesParser, QWEN_TWO_CALLS),
    "llama3": (Llama3Parser, LLAMA_TWO_CALLS),
    "mistral array": (MistralParser, MISTRAL_ARRAY),
    "mistral named": (MistralParser, MISTRAL_NAMED),
    "json": (PlainJsonParser, JSON_ARRAY),
}


def call_spans(output: str) -> list[tuple[int, int]]:
    """Where each call object of `output` starts and ends."""
    decoder = json.JSONDecoder()
    spans = []
    position = output.find('{"name"')
    while position >= 0:
        _, end = decoder.raw_decode(output, position)
        spans.append((position, end))
        position = output.find('{"name"', end)
    return spans


@pytest.mark.parametrize("case", TRUNCATABLE)
def test_output_cut_inside_a_call_raises_on_close(case):
    """As when the token limit cuts a call short."""
    parser_class, output = TRUNCATABLE[case]
    if parser_class is GenericParser:
        cuts = range(len(output.rstrip()))  # the whole output is one object
    elif parser_class is MistralParser and "[ARGS]" in output:
        marker = "[TOOL_CALLS]"
        cuts = [cut for start in _all(output, marker) for cut in range(start + len(marker), output.index("}", start))]
    else:
        # plain JSON is text until its first key shows it is a call: `[{"na` cut there stays text
        first_cut = len('{"name"') if parser_class is PlainJsonParser else 1
        cuts = [cut for start, end in call_spans(output) for cut in range(start + first_cut, end)]
    assert cuts
    for cut in cuts:
        assert_raises_on_close(parser_class, [output[:cut]])
        assert_raises_on_close(parser_class, list(output[:cut]))


def _all(text: str, part: str) -> list[int]:
    return [index for index in range(len(text)) if text.startswith(part, index)]


def test_feed_after_an_error_is_ignored():
    parser = GenericParser()
    assert parser.feed("nonsense") == []
    assert parser.error is not None
    assert parser.feed('{"response": "x"}') == []
    with pytest.raises(ToolSyntaxError):
        parser.close()


def test_registry_and_detection():
    assert set(PARSERS) == {"generic", "hermes", "llama3", "mistral", "json"}
    assert all(issubclass(parser_class, ToolCallParser) for parser_class in PARSERS.values())
    qwen = (
        "{%- if tools %}{{- '<|im_start|>system\\n' }}# Tools\\n<tools>{% for tool in tools %}"
        "{{ tool | tojson }}{% endfor %}</tools>\\n<tool_call>\\n{\"name\": <function-name>}\\n</tool_call>"
    )
    llama31 = (
        "{%- if tools is not none %}<|start_header_id|>user<|end_header_id|>\\n\\n"
        'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
        "{%- if builtin_tools is defined %}<|python_tag|>{%- endif %}"
    )
    llama32 = (
        "<|start_header_id|>system<|end_header_id|>{%- if tools is not none %}"
        'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    )
    mistral = "{%- if tools %}[AVAILABLE_TOOLS]{{ tools|tojson }}[/AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]"
    other = "{% if tools %}You may call these functions: {{ tools | tojson }}{% endif %}"
    plain = "{% for message in messages %}<|im_start|>{{ message.role }}\\n{{ message.content }}<|im_end|>{% endfor %}"
    llama3_no_tools = "<|start_header_id|>{{ message['role'] }}<|end_header_id|>{{ message['content'] }}<|eot_id|>"
    assert detect_format(qwen) == "hermes"
    assert detect_format(llama31) == "llama3"
    assert detect_format(llama32) == "llama3"
    assert detect_format(mistral) == "mistral"
    assert detect_format(other) == "json"
    assert detect_format(plain) is None
    assert detect_format(llama3_no_tools) is None


# the scanner and the decoder on their own


def test_scanner_finds_the_end_with_a_backslash_split_across_feeds():
    scanner = JsonScanner()
    assert scanner.scan('{"a": "x\\') == -1
    assert scanner.scan('"}') == -1  # the quote was escaped: still inside the string
    assert scanner.scan('"}tail') == 2
    assert scanner.done


@pytest.mark.parametrize(
    ("value", "after"),
    [('"str\\"ing"', ", x"), ("[1, [2, {\"]\": 3}]]", "]"), ("-12.5e3", "}"), ("true", " ,"), ("null", "]")],
)
def test_scanner_ends_every_kind_of_value(value, after):
    text = value + after
    for cut in range(1, len(text) + 1):
        scanner = JsonScanner()
        end = scanner.scan(text[:cut])
        if end < 0:
            end = scanner.scan(text[cut:])
            end = end + cut if end >= 0 else -1
        assert end == len(value), (cut, end)


def test_string_decoder_on_every_splitting():
    encoded = '\\"a\\\\b\\/c\\bd\\fe\\nf\\rg\\th\\u00e9\\ud83d\\ude00\\u4e2d z"rest'
    expected = json.loads('"' + encoded[: encoded.index('"rest')] + '"')
    for pieces in splittings(encoded):
        decoder = JsonStringDecoder()
        decoded, end, offset = "", -1, 0
        for piece in pieces:
            if end >= 0:
                break
            text, end = decoder.feed(piece)
            decoded += text
            assert expected.startswith(decoded)  # whole characters only
            if end >= 0:
                end += offset
            offset += len(piece)
        assert decoded == expected
        assert encoded[end:] == "rest"


def test_string_decoder_replaces_lone_surrogates():
    decoder = JsonStringDecoder()
    assert decoder.feed('\\ud83d x \\ude00"') == ("\ufffd x \ufffd", 16)
