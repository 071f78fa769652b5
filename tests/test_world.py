"""The generated world: determinism, splits, files that pararl.data reads, the exact alignment check."""
import json
import random

import pytest
import torch

from pararl.data import CodeCache, read_records
from shapeworld import EOS, Obj, WorldConfig, WorldSpec, follows, make_scene, make_splits, world_token_format, world_tokenizer, write_world
from shapeworld.tasks import PromptError, sample_example

SPEC = WorldSpec(cell=3, shapes=("square", "plus", "triangle"))  # 3x3-token cells: shapes easy to read in asserts
RED_SQUARE_TL = Obj(0, 0, "red", "square")
BLUE_PLUS_BR = Obj(1, 1, "blue", "plus")


def small_config(seed=0, **kw) -> WorldConfig:
    return WorldConfig(train_size=120, eval_size=30, seed=seed, **kw)


def test_world_is_deterministic_from_its_seed_and_splits_do_not_overlap():
    a_train, a_eval = make_splits(small_config(seed=3))
    b_train, b_eval = make_splits(small_config(seed=3))
    c_train, _ = make_splits(small_config(seed=4))
    assert a_train == b_train and a_eval == b_eval
    assert a_train != c_train
    assert len(a_train) == 120 and len(a_eval) == 30
    assert not {e.key for e in a_train} & {e.key for e in a_eval}
    assert {e.task for e in a_train} == {"generate", "edit"}


def test_every_drawn_example_follows_its_prompt_and_its_description_is_aligned():
    rng = random.Random(0)
    for spec in (SPEC, WorldSpec(), WorldSpec(max_objects=3)):
        for _ in range(300):
            ex = sample_example(spec, rng)
            if ex.task == "edit":
                assert len(ex.prompt.split()) == 7, ex.prompt  # fixed slots
            assert follows(spec, ex.prompt, ex.input, ex.output), ex
            text = spec.describe(ex.output)
            assert spec.aligned(text, spec.render(ex.output)) and spec.agreement(text, spec.render(ex.output)) == 1.0
            assert len(text.split()) <= spec.text_len


def test_records_load_through_pararl_data_and_codes_render_the_scene(tmp_path):
    cfg = small_config()
    paths = write_world(tmp_path / "world", cfg)
    train, held = read_records(paths["train"]), read_records(paths["eval"])
    examples, _ = make_splits(cfg)
    assert len(train) == 120 and len(held) == 30
    cache = CodeCache(tmp_path / "codes", cfg.spec.codec())
    for rec, ex in zip(train, examples):
        assert rec.prompt == ex.prompt and rec.task == ex.task and rec.output_text == cfg.spec.describe(ex.output)
        assert torch.equal(cache.codes(rec.output_image), cfg.spec.render(ex.output))
        if ex.task == "edit":
            assert torch.equal(cache.codes(rec.input_image), cfg.spec.render(ex.input))
        else:
            assert rec.input_image is None
    assert json.loads(paths["world"].read_text())["spec"]["cells"] == [2, 2]


def test_tokenizer_puts_specials_first_and_decoding_drops_text_padding():
    tok = world_tokenizer(SPEC)
    fmt = world_token_format(SPEC, tok)
    assert [tok.convert_ids_to_tokens(i) for i in (fmt.pad_id, fmt.mask_id, fmt.bos_id, fmt.edit_id)] == [
        "<pad>", "<mask>", "<bos>", "<edit>"]
    eos = tok.convert_tokens_to_ids(EOS)
    assert eos not in fmt.special_ids  # the text span may draw it
    text = "red square top left"
    ids = tok(text, add_special_tokens=False)["input_ids"] + [eos] * 3
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert fmt.image_tokens == 36 and fmt.codebook_size == 8
    assert world_token_format(WorldSpec(), tok).image_tokens == 16  # the default run's 4x4-token images
    assert all(tok.convert_tokens_to_ids(w) != tok.unk_token_id for w in SPEC.words())


def test_alignment_check_on_hand_made_cases():
    scene = make_scene([RED_SQUARE_TL, BLUE_PLUS_BR])
    codes = SPEC.render(scene)
    good = "red square top left and blue plus bottom right"
    assert SPEC.aligned(good, codes) and SPEC.agreement(good, codes) == 1.0
    assert SPEC.aligned(good + f" {EOS} {EOS}", codes)
    cases = {
        "wrong colour": "green square top left and blue plus bottom right",
        "wrong shape": "red triangle top left and blue plus bottom right",
        "wrong position": "red square top right and blue plus bottom right",
        "missing object": "red square top left",
        "extra object": "red square top left and blue plus bottom right and red plus top right",
        "named twice": "red square top left and red square top left",
        "not a sentence": "red square top left blue plus bottom right",
        "trailing word": "red square top left and blue plus bottom right and",
        "empty": "",
    }
    for name, text in cases.items():
        assert not SPEC.aligned(text, codes), name
        if name not in ("not a sentence", "trailing word"):  # the soft score is per object, not per sentence
            assert SPEC.agreement(text, codes) < 1.0, name
    assert SPEC.agreement(cases["wrong colour"], codes) == pytest.approx(0.75)  # one of two cells half right
    assert SPEC.agreement(cases["missing object"], codes) == pytest.approx(0.5)


def test_image_parse_refuses_garbled_cells_and_empty_images():
    codes = SPEC.render(make_scene([RED_SQUARE_TL])).clone()
    text = "red square top left"
    assert SPEC.aligned(text, codes)
    mixed = codes.clone()
    mixed[0] = SPEC.code("blue")  # two colours in one cell
    half = codes.clone()
    half[1] = SPEC.code("black")  # a square with a hole is no known shape
    stray = codes.clone()
    stray[-1] = SPEC.code("red")  # one red token in the bottom right cell
    for bad in (mixed, half, stray):
        assert SPEC.parse_image(bad).garbled and not SPEC.aligned(text, bad)
    empty = SPEC.render(())
    assert not SPEC.aligned("", empty) and SPEC.parse_image(empty).objects == ()


def test_prompt_following_checks_edits_and_free_choices():
    inp = make_scene([RED_SQUARE_TL])
    paint = "paint the top left shape in blue"
    assert follows(SPEC, paint, inp, make_scene([Obj(0, 0, "blue", "square")]))
    assert not follows(SPEC, paint, inp, make_scene([Obj(0, 0, "green", "square")]))
    assert follows(SPEC, "make the top left shape a plus", inp, make_scene([Obj(0, 0, "red", "plus")]))
    assert follows(SPEC, "move top left shape to any place", inp, make_scene([Obj(1, 0, "red", "square")]))
    assert not follows(SPEC, "move top left shape to any place", inp, inp)
    assert not follows(SPEC, "move top left shape to bottom right", inp, make_scene([Obj(1, 0, "red", "square")]))
    assert follows(SPEC, "remove the shape at the top left", make_scene([RED_SQUARE_TL, BLUE_PLUS_BR]),
                   make_scene([BLUE_PLUS_BR]))
    with pytest.raises(PromptError):
        follows(SPEC, "remove the shape at the top right", inp, ())
    add = "add a coloured plus at any place"
    assert follows(SPEC, add, inp, make_scene([RED_SQUARE_TL, Obj(0, 1, "yellow", "plus")]))
    assert not follows(SPEC, add, inp, make_scene([RED_SQUARE_TL, Obj(0, 1, "yellow", "square")]))
    assert not follows(SPEC, "add a coloured plus at top left", inp, make_scene([RED_SQUARE_TL, Obj(0, 1, "red", "plus")]))
    two = "draw a blue shape at any place and a coloured square at top left"
    assert follows(SPEC, two, None, make_scene([RED_SQUARE_TL, BLUE_PLUS_BR]))
    assert not follows(SPEC, two, None, make_scene([Obj(0, 1, "red", "square"), BLUE_PLUS_BR]))
    assert not follows(SPEC, "draw a blue shape at any place", None, make_scene([RED_SQUARE_TL]))
    with pytest.raises(PromptError):
        follows(SPEC, "paint it black", None, inp)
