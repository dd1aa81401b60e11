"""Corpora, tokenizer, splits, batching and downloads (against a local HTTP server)."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import torch

from lora_lab import data
from lora_lab.data import (
    CharTokenizer,
    Corpus,
    iterate_batches,
    load_corpus,
    make_splits,
    steps_per_epoch,
    total_steps,
)
from lora_lab.data.sources import NamedCorpus
from lora_lab.training.metrics import evaluation_windows


def test_tokenizer_vocabulary_is_sorted_and_round_trips():
    tok = CharTokenizer.from_text("hello world\n")
    assert tok.vocab == "\n dehlorw"
    ids = tok.encode("world hello")
    assert ids.dtype == torch.long and tok.decode(ids) == "world hello"
    assert CharTokenizer.from_json(tok.to_json()) == tok


def test_unknown_character_is_named_in_the_error():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"'Z' \(at position 2\) is not in the model's vocabulary"):
        tok.encode("abZ")


def test_builtin_split_is_80_20_at_a_sentence_boundary_with_10pct_validation():
    corpus = load_corpus("builtin", builtin_chars=20_000)
    assert corpus.builtin is True
    assert abs(corpus.target_start / len(corpus.text) - 0.8) < 0.01
    assert corpus.text[corpus.target_start - 1] == "\n"
    splits = make_splits(corpus)
    sizes = splits.sizes()
    assert sizes["source_train"] + sizes["source_val"] == corpus.target_start
    assert sizes["target_train"] + sizes["target_val"] == len(corpus.text) - corpus.target_start
    assert sizes["source_val"] == corpus.target_start - int(corpus.target_start * 0.9)
    assert splits.tokenizer.decode(splits.target_val) == corpus.target_text[int(len(corpus.target_text) * 0.9) :]


def test_real_text_is_split_at_80pct_of_characters(tmp_path: Path):
    path = tmp_path / "book.txt"
    path.write_text("abcdefghij" * 100, encoding="utf-8")
    corpus = load_corpus(str(path), block_size=8)
    assert corpus.name == "book.txt" and corpus.target_start == 800 and corpus.builtin is False


def test_a_user_file_named_builtin_is_not_the_builtin_corpus(tmp_path: Path):
    # Being built in is where the text came from (the grammars, whose entropy floor and validity
    # judge apply to it alone), never the name a user's file happens to have.
    path = tmp_path / "data" / "builtin"
    path.parent.mkdir()
    path.write_text("abcdefghij" * 100, encoding="utf-8")
    corpus = load_corpus(str(path), block_size=8)
    assert corpus.name == "builtin" and corpus.text == "abcdefghij" * 100 and corpus.target_start == 800
    assert corpus.builtin is False
    builtin = load_corpus("builtin", builtin_chars=20_000)
    assert builtin.name == "builtin" and builtin.builtin is True
    assert Corpus("builtin", "some text", 4).builtin is False  # a Corpus is the user's unless said otherwise


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"   \n\n", "is empty"),
        (b"\xff\xfe caf\xe9", "is not UTF-8"),
        (b"short text", "must have at least"),
    ],
)
def test_bad_corpus_files_are_refused_clearly(tmp_path: Path, content: bytes, message: str):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_corpus(str(path), block_size=64)


def test_missing_corpus_names_the_alternatives(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="neither a file nor a known corpus.*tinyshakespeare"):
        load_corpus(str(tmp_path / "nope.txt"))


def test_batches_are_deterministic_shifted_and_cover_an_epoch():
    tokens = torch.arange(1000)
    first = list(iterate_batches(tokens, block_size=10, batch_size=8, epochs=1, seed=3))
    second = list(iterate_batches(tokens, block_size=10, batch_size=8, epochs=1, seed=3))
    other = list(iterate_batches(tokens, block_size=10, batch_size=8, epochs=1, seed=4))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))
    assert len(first) == steps_per_epoch(1000, 10, 8) == total_steps(1000, 10, 8, 1)
    x, y = first[0]
    assert x.shape == (8, 10) and torch.equal(y, x + 1)  # tokens are positions, so y is x shifted
    seen = torch.cat([x.flatten() for x, _ in first])
    assert len(set(seen.tolist())) >= 1000 - 2 * 10  # one epoch: every window once (up to the offset)
    assert len(list(iterate_batches(tokens, 10, 8, epochs=2.5, seed=0))) == round(2.5 * len(first))


@pytest.mark.parametrize(("n_tokens", "block"), [(2, 8), (9, 8), (10, 8), (100, 8), (101, 16), (1000, 128)])
def test_evaluation_windows_score_every_target_exactly_once(n_tokens: int, block: int):
    size = min(block, n_tokens - 1)
    scored = []
    for start, first in evaluation_windows(n_tokens, block):
        assert start >= 0 and start + size <= n_tokens - 1
        scored += [start + 1 + offset for offset in range(first, size)]
    assert scored == list(range(1, n_tokens))


# --- downloads, against a server on 127.0.0.1 ----------------------------------------------


class _Server:
    def __init__(self, files: dict[str, bytes]):
        self.hits = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                outer.hits += 1
                if self.path == "/broken-chunked.txt":  # a chunk announces 4096 bytes; the connection drops after 10
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self.wfile.write(b"1000\r\n" + b"x" * 10)
                    return
                body = files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.end_headers()
                self.wfile.write(body if body is not None else b"not found")

            def log_message(self, *args):
                pass

        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def tiny_named_corpus(monkeypatch):
    body = ("to be or not to be, that is the question\n" * 200).encode()
    spec = NamedCorpus(url="unused", sha256=hashlib.sha256(body).hexdigest(), size=len(body), filename="tiny.txt")
    monkeypatch.setitem(data.NAMED_CORPORA, "tiny", spec)
    server = _Server({"/tiny.txt": body, "/wrong.txt": body + b"tampered"})
    yield server, body
    server.close()


def test_download_verifies_checksum_and_is_cached(tmp_path: Path, tiny_named_corpus):
    server, body = tiny_named_corpus
    path = data.download_corpus("tiny", directory=tmp_path, url=server.url + "/tiny.txt")
    assert path.read_bytes() == body
    again = data.download_corpus("tiny", directory=tmp_path, url=server.url + "/tiny.txt")
    assert again == path and server.hits == 1  # second call served from the cache
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.txt"]  # no temporary file left


def test_download_with_wrong_checksum_leaves_nothing(tmp_path: Path, tiny_named_corpus):
    server, _ = tiny_named_corpus
    with pytest.raises(ValueError, match="SHA-256 .* expected .* it was discarded"):
        data.download_corpus("tiny", directory=tmp_path, url=server.url + "/wrong.txt")
    assert list(tmp_path.iterdir()) == []


def test_download_errors_are_clear(tmp_path: Path, tiny_named_corpus):
    server, _ = tiny_named_corpus
    with pytest.raises(ConnectionError, match="could not download 'tiny'.*--corpus PATH"):
        data.download_corpus("tiny", directory=tmp_path, url=server.url + "/missing.txt")
    with pytest.raises(ConnectionError, match="could not download 'tiny'.*IncompleteRead.*--corpus PATH"):
        data.download_corpus("tiny", directory=tmp_path, url=server.url + "/broken-chunked.txt")
    with pytest.raises(ValueError, match="unknown corpus 'nope'; named corpora are: tinyshakespeare"):
        data.download_corpus("nope", directory=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_corrupted_cached_file_is_downloaded_again(tmp_path: Path, tiny_named_corpus):
    server, body = tiny_named_corpus
    (tmp_path / "tiny.txt").write_bytes(b"garbage")
    path = data.download_corpus("tiny", directory=tmp_path, url=server.url + "/tiny.txt")
    assert path.read_bytes() == body and server.hits == 1


def test_named_corpus_loads_through_the_cache(tmp_path: Path, tiny_named_corpus, monkeypatch):
    server, body = tiny_named_corpus
    monkeypatch.setenv("LORA_LAB_CACHE", str(tmp_path))
    data.download_corpus("tiny", url=server.url + "/tiny.txt")
    corpus = load_corpus("tiny", block_size=16)
    assert corpus.text == body.decode() and corpus.name == "tiny"


def test_tinyshakespeare_is_registered_with_the_published_checksum():
    spec = data.NAMED_CORPORA["tinyshakespeare"]
    assert spec.size == 1_115_394
    assert spec.sha256 == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    assert spec.url.endswith("karpathy/char-rnn/master/data/tinyshakespeare/input.txt")
