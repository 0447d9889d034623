"""Token stream utilities: chunking the concatenated corpus and the notebook's proper-noun label."""
import numpy as np

SENTENCE_END = (".", "!", "?", ":")


def chunk_count(n_tokens: int, chunk_tokens: int) -> int:
    """Full chunks of ``chunk_tokens`` in a stream of ``n_tokens``: the incomplete tail is dropped."""
    if chunk_tokens < 2:
        raise ValueError(f"chunk_tokens must be at least 2, got {chunk_tokens}")
    return n_tokens // chunk_tokens


def chunk_stream(token_ids: np.ndarray, chunk_tokens: int) -> np.ndarray:
    """Cut a 1-D token stream into full chunks: (n,) -> (n // chunk_tokens, chunk_tokens).

    The incomplete tail is dropped, as in fixed-length language-model evaluation, so every chunk has
    the same positions 0..chunk_tokens-1 and the same token joins across model sizes on (chunk, pos).
    """
    n_chunks = chunk_count(len(token_ids), chunk_tokens)
    return np.asarray(token_ids[: n_chunks * chunk_tokens]).reshape(n_chunks, chunk_tokens)


def decode_table(tokenizer) -> list[str]:
    """Decoded text of every vocabulary id (index = token id), built once per run."""
    return tokenizer.batch_decode([[i] for i in range(len(tokenizer))])


def vocab_flags(decode: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The two facts the proper-noun rule reads of a token's text: (V,) texts -> (V,) bool, (V,) bool.

    looks_proper: longer than 2 characters and the first non-space character upper-case.
    ends_sentence: ends, trailing whitespace stripped, in one of ``. ! ? :``.
    Judged once per vocabulary entry, so labelling a corpus is two array lookups a token.
    """
    looks_proper = np.array([len(t) > 2 and t.lstrip()[:1].isupper() for t in decode], dtype=bool)
    ends_sentence = np.array([t.rstrip().endswith(SENTENCE_END) for t in decode], dtype=bool)
    return looks_proper, ends_sentence


def proper_noun_labels_from_ids(token_ids: np.ndarray, looks_proper: np.ndarray, ends_sentence: np.ndarray,
                                prev_id: int | None = None) -> np.ndarray:
    """Notebook heuristic over a slice of the token stream: (n,) ids -> (n,) bool.

    A token is a proper noun when it looks proper and the token before it does not end a sentence (a
    capital after a sentence end is just a sentence start); ``looks_proper``, ``ends_sentence`` come
    from ``vocab_flags``. prev_id: the stream's token before this slice, or None when the slice starts
    the stream, whose first token is then never a proper noun (no previous token, so it may be a
    sentence start; the notebook's loop starts at token 1).
    """
    token_ids = np.asarray(token_ids)
    after_end = np.empty(len(token_ids), dtype=bool)
    after_end[1:] = ends_sentence[token_ids[:-1]]
    after_end[:1] = True if prev_id is None else ends_sentence[prev_id]
    return looks_proper[token_ids] & ~after_end


def proper_noun_labels(token_text: list[str]) -> np.ndarray:
    """``proper_noun_labels_from_ids`` for a whole stream given as decoded tokens: (n,) str -> (n,) bool.

    Each token's text is its own vocabulary entry, so the rule is the one the corpus stage applies.
    """
    return proper_noun_labels_from_ids(np.arange(len(token_text)), *vocab_flags(token_text))
