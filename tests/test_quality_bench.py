"""The quality study's answer parsing (bench/quality.py): what counts as a correct generated answer."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import quality  # noqa: E402


def test_choice_labels_are_read_from_the_first_label_in_the_text():
    assert quality.parse_answer("boolq", "the correct answer is True, not false") == "true"
    assert quality.parse_answer("arc_easy", "the correct answer is answer3") == "answer3"
    assert quality.parse_answer("openbookqa", "Answer 2 because answer4 is wrong") == "answer2"
    assert quality.parse_answer("arc_easy", "the correct answer is") is None


def test_math_answers_are_the_last_number_after_the_answer_is_and_compared_numerically():
    text = "\nA: 7 - 3 = 4 crayons. The answer is 4. Check: the answer is 1,204.5"
    assert quality.parse_answer("math", text) == "1204.5"
    assert quality.is_correct("math", quality.parse_answer("math", "The answer is 4."), "4.0")
    assert not quality.is_correct("math", quality.parse_answer("math", "The answer is 5."), "4.0")
    assert not quality.is_correct("math", None, "4")
    assert quality.parse_answer("math", "so she has 4 left") is None


def test_question_normalisation_used_to_drop_test_questions_from_math_training():
    assert quality._normal(" At the schools book-fair, Sam bought 13 books. ") == quality._normal("at the schools book fair sam bought 13 books")
