"""spotrun.jsonlines: the one reader of JSON-lines files, with each caller's policy."""
import pytest

from spotrun.jsonlines import parse_jsonl, read_jsonl


def test_a_torn_last_line_is_left_out_by_default_and_kept_on_request(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_text('{"seq": 1}\n{"seq": 2}\n{"seq": 3}')
    assert read_jsonl(path) == [{"seq": 1}, {"seq": 2}]
    assert read_jsonl(path, skip_torn_last=False) == [{"seq": 1}, {"seq": 2}, {"seq": 3}]


def test_a_bad_line_is_an_error_naming_the_file_and_line_or_skipped(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"a": 1}\nnot json\n[1, 2]\n{"b": 2}\n')
    with pytest.raises(ValueError, match=r"events.jsonl: line 2 is not a JSON record"):
        read_jsonl(path)
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"events.jsonl: line 2 is not a JSON object"):
        read_jsonl(path)
    path.write_text('{"a": 1}\nnot json\n[1, 2]\n{"b": 2}\n')
    assert read_jsonl(path, bad="skip") == [{"a": 1}, {"b": 2}]


def test_blank_lines_are_passed_over_unless_the_caller_counts_them_bad():
    text = '{"a": 1}\n\n  \n{"b": 2}\n'
    assert parse_jsonl(text) == [{"a": 1}, {"b": 2}]
    with pytest.raises(ValueError, match="line 2"):
        parse_jsonl(text, skip_blank=False)


def test_syslog_prefixed_agent_logs_keep_only_the_events():
    text = ('<6>{"event": "agent_started"}\nTraceback (most recent call last):\n'
            '<4>{"event": "volume_held_wait"}\n<3>not json\n')
    assert parse_jsonl(text, bad="skip", syslog_prefix=True) == [
        {"event": "agent_started"}, {"event": "volume_held_wait"}]


def test_a_missing_file_holds_no_records_and_an_unknown_policy_is_refused(tmp_path):
    assert read_jsonl(tmp_path / "not-yet.jsonl") == []
    with pytest.raises(ValueError, match="bad must be"):
        parse_jsonl("", bad="ignore")
