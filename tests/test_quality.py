"""Quality metrics against hand-computed oracles: ``pipelines.metrics`` (generic),
``demo.scoring`` (shapes captions) and ``evaluation.scoring`` (dispatch by reference)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from demo import world as S
from demo.scoring import object_f1, parse_caption
from evaluation.scoring import score_row, score_rows
from pipelines.metrics import exact_match, f1_of_counts, normalize, token_f1


def test_exact_match_normalises_case_punctuation_and_space():
    assert exact_match("Red.", "red") == 1.0
    assert exact_match("  red ", "RED") == 1.0
    assert exact_match("red circle", "red") == 0.0
    assert exact_match(None, "red") == 0.0
    assert exact_match("", "") == 0.0  # an empty answer never matches
    assert normalize("small red circle r1 c2 , large .") == "small red circle r1 c2 large"


def test_parse_caption_reads_objects_and_skips_junk():
    text = "r1 c2 small red circle , r3 c4 large blue cross ."
    assert parse_caption(text) == [("small", "red", "circle", 0, 1), ("large", "blue", "cross", 2, 3)]
    # junk between objects, an incomplete object at the end (a caption cut short)
    text = "the r1 c2 small red circle , , green r3 c4 large blue cross , r2 c1 small"
    assert parse_caption(text) == [("small", "red", "circle", 0, 1), ("large", "blue", "cross", 2, 3)]
    # attributes first is read too
    assert parse_caption("small red circle r1 c2") == [("small", "red", "circle", 0, 1)]
    # wrong field order is not an object
    assert parse_caption("red small circle r1 c2") == []
    assert parse_caption("r1 small red circle c2") == []
    assert parse_caption(None) == []


def test_object_f1_hand_computed():
    a, b, c, d = (("small", "red", "circle", 0, 0), ("large", "blue", "square", 1, 1),
                  ("small", "green", "cross", 2, 2), ("small", "green", "cross", 3, 3))
    assert object_f1([a, b, c], [a, b, c]) == 1.0
    assert object_f1([], []) == 1.0
    assert object_f1([a], []) == 0.0
    # 2 of 3 references found among 4 predictions: P = 1/2, R = 2/3, F1 = 4/7
    assert object_f1([a, b, d, ("large", "red", "circle", 0, 0)], [a, b, c]) == pytest.approx(4 / 7)
    # multiset: a predicted twice matches once
    assert object_f1([a, a], [a]) == pytest.approx(2 * 0.5 * 1 / 1.5)
    # one wrong field (position) is a miss
    assert object_f1([("small", "red", "circle", 0, 1)], [a]) == 0.0


def test_f1_of_counts_hand_computed():
    # pred {x×2, y}, ref {x, z×2}: 1 matched, P = 1/3, R = 1/3, F1 = 1/3
    assert f1_of_counts(Counter("xxy"), Counter("xzz")) == pytest.approx(1 / 3)
    assert f1_of_counts(Counter(), Counter()) == 1.0
    assert f1_of_counts(Counter("x"), Counter()) == 0.0 and f1_of_counts(Counter(), Counter("x")) == 0.0


def test_token_f1_hand_computed():
    assert token_f1("a red circle", "a red circle") == 1.0
    # pred {a, blue, circle}, ref {a, red, circle}: 2 matched, P = R = 2/3
    assert token_f1("a blue circle", "a red circle") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0 and token_f1("x", "y") == 0.0


def test_scene_caption_scores_one_against_itself_and_less_when_an_object_is_dropped():
    rng = S.rng_for("test", 0, 0)
    scene = S.make_scene(rng, n_objects=4)
    ref = json.dumps({"task": "caption", "objects": [list(o.key) for o in scene.objects]})
    assert score_row(S.caption(scene), ref) == ("caption_object_f1", 1.0)
    fewer = " , ".join(o.words for o in scene.objects[:3]) + " ."
    # 3 of 4 found, no false positive: P = 1, R = 3/4, F1 = 6/7
    assert score_row(fewer, ref) == ("caption_object_f1", pytest.approx(6 / 7))


def test_score_rows_metrics_errors_and_headline():
    rows = [
        {"output": "red", "reference": json.dumps({"task": "vqa", "answer": "red"}), "error": None},
        {"output": "blue", "reference": json.dumps({"task": "vqa", "answer": "red"}), "error": None},
        {"output": None, "reference": json.dumps({"task": "vqa", "answer": "red"}), "error": "decode failed"},
        {"output": "r1 c1 small red circle .", "reference": json.dumps({"task": "caption", "objects": [["small", "red", "circle", 0, 0]]}), "error": None},
        {"output": "left", "reference": json.dumps({"task": "video", "answer": "left"}), "error": None},
        {"output": "whatever", "reference": None, "error": None},
    ]
    out = score_rows(rows)
    assert out["vqa_accuracy"] == pytest.approx(1 / 3) and out["n_vqa_accuracy"] == 3
    assert out["caption_object_f1"] == 1.0 and out["video_accuracy"] == 1.0
    assert out["errors"] == 1
    assert out["quality"] == pytest.approx((1 / 3 + 1.0) / 2)


def test_score_rows_scores_error_rows_as_wrong_even_with_an_output_and_goes_past_unscorable_rows():
    vqa = json.dumps({"task": "vqa", "answer": "red"})
    rows = [
        {"output": "anything", "reference": None, "error": None},  # nothing to score against: skipped
        {"output": "red", "reference": vqa, "error": "generation failed (timeout)"},  # an error row scores 0
        {"output": None, "reference": vqa, "error": "decode failed"},
        {"output": "blue", "reference": vqa, "error": None},
    ]
    out = score_rows(rows)
    assert out["errors"] == 2
    assert out["vqa_accuracy"] == 0.0 and out["n_vqa_accuracy"] == 3  # its output "red" is not read


def test_plain_references_from_a_user_manifest():
    rows = [
        {"output": "Yes.", "reference": "yes", "error": None},
        {"output": "a dog on a red sofa", "reference": "a dog sits on a red sofa", "error": None},
    ]
    out = score_rows(rows)
    assert out["accuracy"] == 1.0
    # pred {a×2, dog, on, red, sofa} (6) vs ref {a×2, dog, sits, on, red, sofa} (7): 6 matched
    assert out["caption_token_f1"] == pytest.approx(2 * 1 * (6 / 7) / (1 + 6 / 7))
    assert out["quality"] == pytest.approx((1.0 + out["caption_token_f1"]) / 2)
    assert score_rows([{"output": "x", "reference": None}])["quality"] is None


def test_vqa_accuracy_by_question_type():
    def q(answer, qtype, output):
        return {"output": output, "error": None, "reference": json.dumps({"task": "vqa", "answer": answer, "qtype": qtype})}

    rows = [q("red", "color_at", "red"), q("blue", "color_at", "green"), q("two", "count_kind", "two"),
            q("yes", "exists", "no"), {"output": None, "error": "bad file", "reference": json.dumps({"task": "vqa", "answer": "no", "qtype": "exists"})}]
    scores = score_rows(rows)
    assert scores["vqa_accuracy_by_type"] == {"color_at": 0.5, "count_kind": 1.0, "exists": 0.0}
    assert scores["vqa_accuracy"] == pytest.approx(2 / 5)
    # plain references carry no question type: no breakdown
    assert "vqa_accuracy_by_type" not in score_rows([{"output": "a", "error": None, "reference": "a"}])


def test_plain_and_malformed_references_and_a_reference_without_an_answer():
    from evaluation.scoring import parse_reference

    assert normalize(None) == "" and normalize("  A, b!  ") == "a b"
    assert parse_reference("a red cube") == {"task": "text", "answer": "a red cube"}
    assert parse_reference('{"task": "vqa", "answer": "red"}') == {"task": "vqa", "answer": "red"}
    # text that looks like JSON but is not: a plain reference, not an error
    assert parse_reference("{not json, really}") == {"task": "text", "answer": "{not json, really}"}
    assert parse_reference('{"answer": "no task"}') == {"task": "text", "answer": '{"answer": "no task"}'}
    assert parse_reference("  ...  ") is None and parse_reference(None) is None
    # a task this harness does not know and no answer: scored against an empty answer (token F1 0)
    assert score_row("a red cube", {"task": "unknown"}) == ("caption_token_f1", token_f1("a red cube", ""))
