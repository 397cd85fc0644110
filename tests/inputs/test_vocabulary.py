"""Whether a fine-tune's tokenizer files hold another vocabulary than its base's (inputs.vocabulary)."""

from __future__ import annotations

import json

from modelstore.inputs.vocabulary import vocabulary_differs


def _tokenizer(added: list[dict], indent: int | None = None, **flags) -> bytes:
    return json.dumps({"version": "1.0", "model": {"type": "WordPiece", "vocab": {"a": 0, "b": 1}},
                       "added_tokens": [{**t, **flags} for t in added]}, indent=indent).encode()


def test_the_vocabulary_decides_not_the_bytes():
    base = {"tokenizer.json": _tokenizer([{"id": 2, "content": "[CLS]"}]), "vocab.txt": b"a\nb\n",
            "tokenizer_config.json": b'{"model_max_length": 512}'}
    resaved = {"tokenizer.json": _tokenizer([{"id": 2, "content": "[CLS]"}], indent=2, special=True),
               "vocab.txt": b"a\nb\n", "tokenizer_config.json": b'{"model_max_length": 256, "extra": 1}'}
    assert not vocabulary_differs(resaved, base)
    added = {**resaved, "tokenizer.json": _tokenizer([{"id": 2, "content": "[CLS]"}, {"id": 3, "content": "zorb"}])}
    assert vocabulary_differs(added, base)
    assert vocabulary_differs({**resaved, "vocab.txt": b"a\nb\nc\n"}, base)
    assert vocabulary_differs({"added_tokens.json": b'{"zorb": 3}'}, base)
    assert not vocabulary_differs({"added_tokens.json": b"{}"}, base)
    assert vocabulary_differs({"spiece.model": b"x"}, base)


def test_added_tokens_without_ids_are_compared_not_ordered():
    """A token without an id beside ones with ids: compared as a set, never ordered None < 3."""
    one = _tokenizer([{"id": None, "content": "x"}, {"id": 3, "content": "y"}])
    other = _tokenizer([{"id": 3, "content": "y"}, {"id": None, "content": "x"}], indent=2)
    assert not vocabulary_differs({"tokenizer.json": one}, {"tokenizer.json": other})
