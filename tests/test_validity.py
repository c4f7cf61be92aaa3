"""The one validity rule (data/validity.py) on the layouts people convert: what it accepts, why it
rejects, and that every sample it accepts has a generation prompt holding all its images."""

from pathlib import Path

import pytest

from data.chat import IGNORE, ChatTokenizer, expand_images
from data.validity import REASONS, InvalidSample, check_record, image_paths, visual_count
from tests.llava_layouts import SKIPPED, USABLE, gpt, human

FILE_REASONS = {"missing_image", "corrupt_image", "outside_image"}  # decided by reading the files (converter)


@pytest.mark.parametrize("record,n_images", USABLE, ids=[r["id"] for r, _ in USABLE])
def test_usable_layouts_pass(record, n_images):
    assert len(image_paths(record)) == n_images
    conversation = check_record(record, n_images)
    assert conversation.answer.strip() and conversation.question().count("<image>") == n_images


@pytest.mark.parametrize("record,reason", [(r, n) for r, n in SKIPPED if n not in FILE_REASONS],
                         ids=[str(r.get("id") if isinstance(r, dict) else r) for r, n in SKIPPED if n not in FILE_REASONS])
def test_unusable_records_are_refused_with_their_reason(record, reason):
    with pytest.raises(InvalidSample) as info:
        check_record(record, visual_count(record) if isinstance(record, dict) else 0)
    assert info.value.reason == reason and reason in REASONS and str(info.value)


def test_the_evaluated_reply_follows_the_turn_that_completes_the_images():
    opening = next(r for r, _ in USABLE if r["id"] == "assistant_first")
    c = check_record(opening, 1)
    assert (c.eval_reply, c.answer, c.reply_number) == (2, "green", 1)  # the opening assistant turn is context
    assert c.question() == "<image>\nWhich color is this?"
    spread = check_record({"conversations": [human("<image>\nfirst"), gpt("one"), human("<image>\nand this?"), gpt("two")]}, 2)
    assert (c := spread).answer == "two" and c.question() == "<image>\nfirst\n<image>\nand this?"
    text = check_record({"conversations": [human("hi"), gpt(""), gpt("hello"), human("bye"), gpt("ciao")]}, 0)
    assert text.answer == "hello"  # the first non-empty reply after the first user turn
    system = check_record({"conversations": [{"from": "system", "value": "S1"}, {"from": "system", "value": "S2"}, human("q"), gpt("a")]}, 0)
    assert system.system == "S1\nS2" and system.turns == (("user", "q"), ("assistant", "a"))
    with pytest.raises(InvalidSample, match="assistant reply follows the user turn that carries") as info:
        check_record({"conversations": [human("<image>\nfirst"), gpt("one"), human("<image>\nsecond")]}, 2)
    assert info.value.reason == "no_assistant_reply"


def test_an_unknown_reason_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown skip reason"):
        InvalidSample("because", "x")


@pytest.fixture
def chat(task_tokenizer):
    return ChatTokenizer(task_tokenizer, "vicuna", num_image_tokens=4, max_length=512, system="SYS")


@pytest.mark.parametrize("record,n_images", USABLE, ids=[r["id"] for r, _ in USABLE])
def test_every_accepted_sample_has_a_prompt_with_all_its_images(chat, record, n_images):
    """What training accepts, evaluation can prompt: the generation prompt (everything before the
    evaluated reply) holds every image token, and the answer is the reply the prompt asks for."""
    enc = chat.encode(record["conversations"], n_images=n_images)
    image = chat.image_token_id
    assert enc.input_ids.count(image) == 4 * n_images == enc.input_ids[: enc.prompt_len].count(image)
    reply = chat.tok.decode([t for t, lab in zip(enc.input_ids[enc.prompt_len :], enc.labels[enc.prompt_len :]) if lab != IGNORE])
    assert reply.strip().startswith(enc.answer.strip()) and enc.answer == check_record(record, n_images).answer
    assert all(lab == IGNORE for t, lab in zip(enc.input_ids, enc.labels) if t == image)


def test_a_records_system_turn_replaces_the_default_system_prompt(chat):
    record = next(r for r, _ in USABLE if r["id"] == "sys")
    text, _, _ = chat.render(record["conversations"])
    assert text.startswith("You answer in one word. USER: <image>") and "SYS" not in text
    assert chat.render(USABLE[0][0]["conversations"])[0].startswith("SYS USER:")


def test_each_image_is_expanded_in_its_place_with_its_own_count(chat):
    record = next(r for r, _ in USABLE if r["id"] == "ov_spread")
    enc = chat.encode(record["conversations"], n_images=3, image_tokens=[2, 3, 5])
    ids = enc.input_ids
    runs, k = [], 0
    while k < len(ids):  # (start, length) of each run of image tokens
        if ids[k] == chat.image_token_id:
            start = k
            while k < len(ids) and ids[k] == chat.image_token_id:
                k += 1
            runs.append((start, k - start))
        k += 1
    assert [n for _, n in runs] == [2, 3, 5]
    between = [chat.tok.decode(ids[a + n : b]) for (a, n), (b, _) in zip(runs, runs[1:])]
    assert between == ["\nPicture 2: ", "\nPicture 3: "]  # the text between the images, as written


def test_expand_images_maps_positions_and_checks_counts():
    ids, where = expand_images([1, 3, 7, 3, 9], 3, [2, 1])
    assert ids == [1, 3, 3, 7, 3, 9] and where == [0, 1, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="2 <image> token"):
        expand_images([3, 3], 3, [1])
    with pytest.raises(ValueError, match="1 <image> token"):
        expand_images([3], 3, [1, 1])


def test_too_long_samples_are_refused_with_a_reason(task_tokenizer):
    conv = [human("<image>\nwhat color is the small dot ?"), gpt("red")]
    short = ChatTokenizer(task_tokenizer, "vicuna", num_image_tokens=4, max_length=14, system="")
    with pytest.raises(InvalidSample, match="no supervised token") as info:
        short.encode(conv)  # everything but the reply fits: nothing left to learn from
    assert info.value.reason == "too_long"


def test_the_docs_explain_every_reason():
    table = (Path(__file__).resolve().parents[1] / "docs" / "data-conversion.md").read_text()
    assert [r for r in REASONS if f"| `{r}` |" not in table] == []
