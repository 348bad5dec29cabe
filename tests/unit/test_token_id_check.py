"""``train.check_token_ids``: a token id the model's embedding lacks is refused at start-up, naming the
first such pair (by position, whichever field holds it) and how many others there are."""

import pytest

from orpo_ds.data import DataError, TokenizedPair
from orpo_ds.train import check_token_ids


class _Tokenizer:
    def __init__(self, size):
        self.size = size

    def __len__(self):
        return self.size


def _pairs():
    return [TokenizedPair(10, (3, 4), (5, 2), (6, 2)),
            TokenizedPair(11, (3, 4), (5, 2), (6, 9, 2)),  # 9 in its rejected answer
            TokenizedPair(12, (3, 4), (5, 2), (6, 2)),
            TokenizedPair(13, (8, 4), (5, 2), (6, 2))]  # 8 in its prompt, scanned first


def test_the_first_offending_pair_is_named_whatever_field_holds_it_with_the_count_of_others():
    with pytest.raises(DataError, match=r"pair 11 \(and 1 other pair\(s\)\) holds token id 9, beyond the model's "
                                        r"embedding of 8 tokens \(the tokenizer has 10\)"):
        check_token_ids(_pairs(), "d.jsonl", _Tokenizer(10), vocab_size=8)


def test_ids_within_the_embedding_pass_and_a_tokenizer_no_larger_is_not_read():
    check_token_ids(_pairs(), "d.jsonl", _Tokenizer(10), vocab_size=10)
    check_token_ids(_pairs(), "d.jsonl", _Tokenizer(8), vocab_size=8)  # cannot make an id >= 8: not scanned
    check_token_ids(_pairs(), "d.jsonl", _Tokenizer(10), vocab_size=None)  # the config does not say
