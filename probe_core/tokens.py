"""Token stream utilities: chunking the concatenated corpus and the notebook's proper-noun label."""
import numpy as np

SENTENCE_END = (".", "!", "?", ":")


def chunk_stream(token_ids: np.ndarray, chunk_tokens: int) -> np.ndarray:
    """Cut a 1-D token stream into full chunks: (n,) -> (n // chunk_tokens, chunk_tokens).

    The incomplete tail is dropped, as in fixed-length language-model evaluation, so every chunk has
    the same positions 0..chunk_tokens-1 and the same token joins across model sizes on (chunk, pos).
    """
    if chunk_tokens < 2:
        raise ValueError(f"chunk_tokens must be at least 2, got {chunk_tokens}")
    n_chunks = len(token_ids) // chunk_tokens
    return np.asarray(token_ids[: n_chunks * chunk_tokens]).reshape(n_chunks, chunk_tokens)


def proper_noun_labels(token_text: list[str]) -> np.ndarray:
    """Notebook heuristic over a token stream: (n,) decoded tokens -> (n,) bool.

    A token is a proper noun when its decoded text is longer than 2 characters, its first non-space
    character is upper-case, and the previous token (trailing whitespace stripped) does not end in
    one of ``. ! ? :`` (a capital after a sentence end is just a sentence start). The first token of
    the stream is never a proper noun: it has no previous token, so it may be a sentence start (the
    notebook's loop starts at token 1). Only the stream's first token: chunks cut a labelled stream.
    """
    text = np.asarray(token_text, dtype=object)
    first = np.array([t.lstrip()[:1] for t in text], dtype=object)
    capital = np.array([c.isupper() for c in first], dtype=bool)
    long_enough = np.array([len(t) > 2 for t in text], dtype=bool)
    prev_end = np.zeros(len(text), dtype=bool)
    if len(text) > 1:
        prev_end[1:] = [t.rstrip().endswith(SENTENCE_END) for t in text[:-1]]
    labels = capital & long_enough & ~prev_end
    labels[:1] = False
    return labels


def decode_table(tokenizer) -> list[str]:
    """Decoded text of every vocabulary id (index = token id), built once per run."""
    return tokenizer.batch_decode([[i] for i in range(len(tokenizer))])


def proper_noun_labels_from_ids(token_ids: np.ndarray, decode: list[str]) -> np.ndarray:
    """``proper_noun_labels`` for a stream of ids: (n,) -> (n,) bool, through per-vocabulary lookups.

    The rule only looks at each token's own text and its predecessor's, so it is judged once per
    vocabulary entry and indexed: no per-token Python strings for a whole corpus. The stream's first
    token is never labelled (no previous token), as in ``proper_noun_labels``.
    """
    token_ids = np.asarray(token_ids)
    looks_proper = np.array([len(t) > 2 and t.lstrip()[:1].isupper() for t in decode], dtype=bool)
    ends_sentence = np.array([t.rstrip().endswith(SENTENCE_END) for t in decode], dtype=bool)
    labels = looks_proper[token_ids]
    labels[1:] &= ~ends_sentence[token_ids[:-1]]
    labels[:1] = False
    return labels
