"""Record encoding (the one chat-format path) and deterministic training batches."""

import pytest
import torch

from distill.data import SequencePool, encode_records
from tests.builders import tiny_teacher

TEACHER = tiny_teacher(32, 64, 1, 2, 1, 64)
RECORDS = [
    {"id": "a", "task": "addition", "prompt": "12+34=", "response": "C:000 #### 46"},
    {"id": "b", "task": "addition", "prompt": "5+7=", "response": "C:10 #### 12"},
    {"id": "c", "task": "sorting", "prompt": "sort 3 1 2", "response": "#### 1 2 3"},
]


def test_encoding_uses_the_chat_format_and_appends_eos():
    examples = encode_records(TEACHER, RECORDS, 16)
    assert examples[0].prompt == TEACHER.encode_prompt("12+34=").ids
    assert TEACHER.tokenizer.decode(examples[0].prompt) == "<|bos|><|user|>12+34=<|assistant|>"
    assert examples[0].response[-1] == TEACHER.eos_token_id
    assert TEACHER.decode_response(examples[0].response) == "C:000 #### 46"
    assert [example.task for example in examples] == ["addition", "addition", "sorting"]


def test_too_long_response_names_the_field_and_record():
    with pytest.raises(ValueError, match=r"data.max_response_tokens: record a needs 14"):
        encode_records(TEACHER, RECORDS[:1], 13)


def test_batches_are_deterministic_single_task_and_padded_within_canvas():
    examples = encode_records(TEACHER, RECORDS, 20)
    pool = SequencePool(examples, micro_batch_size=6, max_response_tokens=20, pad_id=TEACHER.pad_token_id, seed=3)
    first, again = pool.batch(7), pool.batch(7)
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(pool.batch(8)["input_ids"], first["input_ids"])
    other_rank = SequencePool(examples, 6, 20, TEACHER.pad_token_id, seed=3, rank=1).batch(7)
    assert not torch.equal(other_rank["input_ids"], first["input_ids"])
    by_prompt = {tuple(example.prompt): example for example in examples}
    for index in range(20):
        batch = pool.batch(index)
        tasks = set()
        for row in range(6):
            ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
            response = batch["input_ids"][row][batch["response_mask"][row].bool()].tolist()
            prompt = ids[: len(ids) - len(response)]
            example = by_prompt[tuple(prompt)]
            tasks.add(example.task)
            # The response is the answer + EOS, then only pad tokens, never past the canvas.
            assert response[: len(example.response)] == example.response
            assert set(response[len(example.response) :]) <= {TEACHER.pad_token_id}
            assert len(response) <= 20
        assert len(tasks) == 1
