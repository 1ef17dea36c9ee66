"""Step 08's own checks on the turns table: which turn had to encode its image, and whether the others
took it from the server's cache. The numbers are those of the arm64 rehearsal's conversation (two
cases about the same image: the second case's first question found the image cached)."""
import pandas as pd
import pytest

from llava_gguf.steps import serve

IMAGE = ["test-1.jpeg"]


def turns(rows):
    return pd.DataFrame([{"case": c, "turn": t, "images": i, "prompt_n": p, "cache_n": n} for c, t, i, p, n in rows])


REHEARSAL = [(0, 1, IMAGE, 2357, 0), (0, 2, [], 36, 2357), (0, 3, [], 38, 2393),
             (1, 1, IMAGE, 11, 2347), (1, 2, [], 36, 2358), (1, 3, [], 38, 2394)]


def test_a_second_case_about_the_same_image_is_a_cached_image_question_not_a_first_answer():
    t = turns(REHEARSAL)
    assert serve.turn_kinds(t) == ["first", "follow-up", "follow-up", serve.CACHED_IMAGE, "follow-up", "follow-up"]


def test_a_new_image_in_a_later_case_is_a_first_answer():
    t = turns([(0, 1, IMAGE, 2357, 0), (1, 1, ["other.png"], 1600, 8)])
    assert serve.turn_kinds(t) == ["first", "first"]


def test_the_rehearsal_conversation_passes_its_checks():
    t = turns(REHEARSAL)
    t["kind"] = serve.turn_kinds(t)
    checks = serve.check_turns(t)
    assert checks["ok"].all() and len(checks) == 1 + 5


def test_a_follow_up_that_encoded_the_image_again_fails_naming_the_turn():
    rows = [*REHEARSAL]
    rows[4] = (1, 2, [], 2390, 4)  # the slot was lost: the whole history processed again
    t = turns(rows)
    t["kind"] = serve.turn_kinds(t)
    with pytest.raises(serve.ServeError, match=r"case 1 turn 2 \(follow-up\).*2390 new, 4 cached; the image's turn had 2357"):
        serve.check_turns(t)


def test_a_conversation_cut_short_fails():
    t = turns(REHEARSAL[:5])
    t["kind"] = serve.turn_kinds(t)
    with pytest.raises(serve.ServeError, match="every case asked its first question and all follow-ups"):
        serve.check_turns(t)


def restart(new, cached, first=2357, restored=2400):
    return {"restart_first_prompt_n": first, "restored_follow_up_prompt_n": new, "restored_follow_up_cache_n": cached,
            "slot_restored_tokens": restored}


def test_a_restored_follow_up_passes_and_one_that_encoded_the_image_again_fails():
    assert serve.check_restart(restart(36, 2400))["ok"]
    failed = serve.check_restart(restart(2436, 0, restored=0))  # the file restored nothing: all processed again
    assert not failed["ok"] and "2436 new, 0 cached after restoring 0 tokens" in failed["detail"]
    assert not serve.check_restart(restart(None, None))["ok"]  # a server that gave no counts proves nothing
