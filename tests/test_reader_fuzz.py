"""Damaged files meet kiln's readers with a one-line KilnError: never another exception, never a hang,
never an allocation sized by a damaged length field.

Property-based (hypothesis): small real files, a GGUF written by gguf-py's GGUFWriter and a
safetensors file written by `safetensors.numpy.save_file`, are truncated, bit-flipped, or have an
8-byte field overwritten with an extreme length (2**60, 2**64-1, ...), and every reader entry point
is driven over the result: kiln.gguf_header (header, every key, every tensor's data, dequantized)
and the commands built on it (inspect, validate, geometry, Modelfile, imatrix), and
kiln.checkpoint.tensors (header, every tensor). A reader may accept a damaged file (a flipped bit
in tensor data is still a valid file); what it may not do is raise anything but KilnError, run past
a time limit, or allocate more than a few MiB for files of a few hundred bytes.

The runs are derandomized (the same examples every time, no example database left in the tree).
"""

from __future__ import annotations

import json
import signal
import struct
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln.bench.geometry import read_geometry
from kiln.checkpoint.tensors import open_safetensors
from kiln.compress.imatrix_file import read_imatrix
from kiln.errors import KilnError
from kiln.export.gguf import validate_gguf
from kiln.export.modelfile import render_modelfile
from kiln.gguf_header import open_gguf, read_header
from kiln.inspect_artifact import inspect_gguf

EXAMPLES = 200
TIME_LIMIT_S = 5.0  # per example; the readers take milliseconds on these files
MEMORY_LIMIT = 8 << 20  # bytes a reader may allocate (traced) on a file of a few hundred bytes
FUZZ = settings(max_examples=EXAMPLES, deadline=timedelta(seconds=3), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# values a damaged length or count field may take: zero, one, the 32-bit edges, beyond any file, beyond int64
EXTREMES = [0, 1, 2**31, 2**32 - 1, 2**32, 2**60, 2**63 - 1, 2**63, 2**64 - 1]


# ----------------------------------------------------------------------------- seed files

def _tiny_gguf(path: Path) -> bytes:
    """A small GGUF with every kind of value kiln reads and F32, F16, Q8_0 tensors."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    w = GGUFWriter(str(path), "llama")
    w.add_name("fuzz")
    w.add_custom_alignment(64)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_head_count(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "ab", "\u00fc"])
    w.add_token_merges(["a b"])
    w.add_token_types([1, 1, 1, 3])
    w.add_bool("fuzz.flag", True)
    w.add_array("fuzz.ints", [1, -2, 3])
    w.add_uint64("fuzz.big", 2**40)
    w.add_chat_template("{{ messages }}")
    w.add_tensor("token_embd.weight", np.arange(4 * 32, dtype=np.float32).reshape(4, 32) / 7)
    w.add_tensor("blk.0.attn_norm.weight", np.linspace(-1, 1, 32).astype(np.float16))
    rows = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
    q8 = quantize(rows, GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_q.weight", q8, raw_shape=q8.shape, raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def _tiny_safetensors(path: Path) -> bytes:
    from safetensors.numpy import save_file

    save_file({"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones((2, 2), np.float16),
               "c": np.arange(5, dtype=np.int8)}, str(path), metadata={"format": "pt"})
    return path.read_bytes()


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("fuzz-seeds")
    gguf = _tiny_gguf(d / "seed.gguf")
    return {"gguf": gguf, "gguf_fields": gguf_fields(gguf), "safetensors": _tiny_safetensors(d / "seed.safetensors")}


# ----------------------------------------------------------------------------- damage

def gguf_fields(data: bytes) -> list[tuple[int, int]]:
    """(offset, width) of every number in a GGUF header: version, counts, lengths, type codes, scalar
    values, dimensions, tensor offsets. Walked here, independently of the reader under test."""
    widths = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    out, pos = [(4, 4), (8, 8), (16, 8)], 24
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)

    def string() -> None:
        nonlocal pos
        out.append((pos, 8))
        pos += 8 + struct.unpack_from("<Q", data, pos)[0]

    for _ in range(n_kv):
        string()
        (vtype,) = struct.unpack_from("<I", data, pos)
        out.append((pos, 4))
        pos += 4
        if vtype == 8:
            string()
        elif vtype == 9:
            etype, count = struct.unpack_from("<IQ", data, pos)
            out += [(pos, 4), (pos + 4, 8)]
            pos += 12
            for _ in range(count):
                if etype == 8:
                    string()
                else:
                    out.append((pos, widths[etype]))
                    pos += widths[etype]
        else:
            out.append((pos, widths[vtype]))
            pos += widths[vtype]
    for _ in range(n_tensors):
        string()
        (n_dims,) = struct.unpack_from("<I", data, pos)
        out += [(pos, 4)] + [(pos + 4 + 8 * i, 8) for i in range(n_dims)] + [(pos + 4 + 8 * n_dims, 4),
                                                                              (pos + 8 + 8 * n_dims, 8)]
        pos += 16 + 8 * n_dims
    return out


@st.composite
def damaged(draw, data: bytes, fields: list[tuple[int, int]] | None = None) -> bytes:
    """`data` truncated, with bits flipped, or with a number overwritten by an extreme or small value
    (a header field of the format when `fields` lists them, else any 8 bytes)."""
    kind = draw(st.sampled_from(["truncate", "flip", "field", "field", "flip+truncate"]))
    out = bytearray(data)
    if kind in ("flip", "flip+truncate"):
        for pos, bit in draw(st.lists(st.tuples(st.integers(0, len(out) - 1), st.integers(0, 7)),
                                      min_size=1, max_size=4)):
            out[pos] ^= 1 << bit
    for _ in range(draw(st.integers(1, 2)) if kind == "field" else 0):  # two at once: a zero and a huge dim
        pos, width = draw(st.sampled_from(fields)) if fields else (draw(st.integers(0, len(out) - 8)), 8)
        value = draw(st.sampled_from(EXTREMES) | st.integers(0, 300) | st.integers(0, 2**64 - 1))
        out[pos:pos + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
    if kind in ("truncate", "flip+truncate"):
        out = out[:draw(st.integers(0, len(out) - 1))]
    return bytes(out)


def _alarm(signum, frame):
    raise TimeoutError(f"a reader ran past {TIME_LIMIT_S} s")


@contextmanager
def bounded() -> Iterator[None]:
    """Fails the example if the body runs past TIME_LIMIT_S or allocates more than MEMORY_LIMIT."""
    started = tracemalloc.is_tracing()
    if not started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT_S, 0.5)  # repeats: one may land where it is swallowed
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        peak = tracemalloc.get_traced_memory()[1] - base
        if not started:
            tracemalloc.stop()
    assert peak <= MEMORY_LIMIT, f"a reader allocated {peak / 2**20:.1f} MiB on a tiny file"


def only_kiln_errors(fn: Callable[[], object]) -> None:
    """Run `fn` within the bounds; a KilnError is a fine answer to a damaged file, and must be one line."""
    with bounded():
        try:
            fn()
        except KilnError as exc:
            assert "\n" not in str(exc), str(exc)


# ----------------------------------------------------------------------------- GGUF

def _drive_gguf(path: Path) -> None:
    """Everything kiln does with a GGUF's bytes, short of handing it to llama.cpp."""
    g = open_gguf(path)
    for key in g.keys():
        g.get(key)
        g.get(key, raw=True)
        g.array_len(key)
    read_header(path, g.keys())
    with np.errstate(all="ignore"):  # damaged scales give inf/NaN: values, not errors
        for t in g.tensors:
            float(np.asarray(g.tensor_data(t), dtype=np.float64).sum())
            g.dequantize(t)


def _drive_gguf_commands(path: Path) -> None:
    """The commands that read a GGUF, each of which must give a KilnError or its answer."""
    for command in (inspect_gguf, validate_gguf, read_geometry, render_modelfile, read_imatrix):
        try:
            command(path)
        except KilnError as exc:
            assert "\n" not in str(exc), str(exc)


def test_seed_gguf_reads_back(seeds, tmp_path):
    """The undamaged seed is read completely and equals what gguf-py's own reader sees."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    path = tmp_path / "seed.gguf"
    path.write_bytes(seeds["gguf"])
    g = open_gguf(path)
    reader = GGUFReader(path)
    assert g.keys() == [k for k in reader.fields if not k.startswith("GGUF.")]
    for key in g.keys():
        assert g.get(key) == reader.fields[key].contents(), key
    assert [t.name for t in g.tensors] == [t.name for t in reader.tensors]
    for ours, theirs in zip(g.tensors, reader.tensors, strict=True):
        assert ours.tensor_type == theirs.tensor_type and list(ours.shape) == [int(d) for d in theirs.shape]
        assert np.array_equal(g.tensor_data(ours), theirs.data)
        assert np.array_equal(g.dequantize(ours), dequantize(theirs.data, theirs.tensor_type).reshape(ours.np_shape))


@pytest.mark.parametrize("drive", [_drive_gguf, _drive_gguf_commands], ids=["reader", "commands"])
@FUZZ
@given(data=st.data())
def test_gguf_on_damaged_files(seeds, tmp_path, data, drive):
    """The reader itself, and the commands that read a GGUF (inspect, validate, geometry, modelfile, imatrix)."""
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(data.draw(damaged(seeds["gguf"], seeds["gguf_fields"])))
    only_kiln_errors(lambda: drive(path))


@pytest.mark.parametrize("what,damage,message", [
    ("truncated", lambda b: b[: len(b) // 2], "runs past the end of the file"),
    ("empty", lambda b: b"", "the file is empty"),
    ("magic", lambda b: b"GGUX" + b[4:], "no GGUF magic"),
    ("version", lambda b: b[:4] + struct.pack("<I", 9) + b[8:], "GGUF version 9 is not supported"),
    ("key type", None, "has unknown value type 99"),
    ("tensor past end", None, "runs past the end of the file"),
])
def test_gguf_messages(seeds, tmp_path, what, damage, message):
    """One wording per problem, the path first, one line."""
    data = seeds["gguf"]
    if what == "key type":  # the first key's type field: after magic, version, counts, name length and name
        (n,) = struct.unpack_from("<Q", data, 24)
        bad = data[:32 + n] + struct.pack("<I", 99) + data[36 + n:]
    elif what == "tensor past end":  # cut inside the tensor that ends last
        path = tmp_path / "seed.gguf"
        path.write_bytes(data)
        bad = data[:max(t.offset + t.n_bytes for t in open_gguf(path).tensors) - 1]
    else:
        bad = damage(data)
    path = tmp_path / "bad.gguf"
    path.write_bytes(bad)
    with pytest.raises(KilnError) as err:
        open_gguf(path)
    assert str(err.value).startswith(f"{path}: not a valid GGUF file (")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_gguf_huge_length_does_not_allocate(seeds, tmp_path):
    """The first key's name length claiming 2**60 bytes: a clean error, nothing allocated for it."""
    data = bytearray(seeds["gguf"])
    data[24:32] = struct.pack("<Q", 2**60)
    path = tmp_path / "huge.gguf"
    path.write_bytes(bytes(data))
    with bounded(), pytest.raises(KilnError, match="at most 65535"):
        open_gguf(path)
    data = bytearray(seeds["gguf"])
    data[16:24] = struct.pack("<Q", 2**60)  # the key count
    path.write_bytes(bytes(data))
    with bounded(), pytest.raises(KilnError, match="runs past the end of the file"):
        open_gguf(path)


# ----------------------------------------------------------------------------- safetensors

def _drive_safetensors(path: Path) -> None:
    src = open_safetensors([path])
    for name in src.names():
        src.shape(name)
        src.dtype(name)
        src.load_raw(name)
        src.load(name)


@FUZZ
@given(data=st.data())
def test_safetensors_reader_on_damaged_files(seeds, tmp_path, data):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data.draw(damaged(seeds["safetensors"])))
    only_kiln_errors(lambda: _drive_safetensors(path))


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                   max_size=4),
                     max_leaves=12)
_ENTRY = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "BOOL", "F8_E4M3", "f32", ""]) | _JSON,
    "shape": st.lists(st.sampled_from([0, 1, 2, 3, 4]) | st.sampled_from(EXTREMES) | st.integers(-3, 2**70),
                      max_size=4) | _JSON,
    "data_offsets": st.lists(st.integers(-4, 64) | st.sampled_from(EXTREMES), min_size=0, max_size=3) | _JSON,
})


_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@st.composite
def _consistent_entry(draw) -> dict:
    """An entry whose byte range agrees with its shape as int64 arithmetic would compute it: a crafted
    file that passes a size check done in wrapping 64-bit integers."""
    dtype = draw(st.sampled_from(sorted(_ITEMSIZE)))
    shape = draw(st.lists(st.sampled_from([0, 1, 2, 3, 4, 2**62, 2**63, 2**64]) | st.integers(0, 2**66),
                          min_size=1, max_size=3))
    n = 1
    for d in shape:
        n *= d
    return {"dtype": dtype, "shape": shape, "data_offsets": [0, n * _ITEMSIZE[dtype] % 2**64]}


@FUZZ
@given(header=st.dictionaries(st.text(max_size=6), _consistent_entry() | _ENTRY | _JSON, max_size=4) | _JSON,
       payload=st.binary(max_size=64))
def test_safetensors_reader_on_arbitrary_headers(tmp_path, header, payload):
    """Well-formed JSON, ill-formed safetensors: every shape, dtype and offset a header can claim."""
    text = json.dumps(header).encode()
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + payload)
    only_kiln_errors(lambda: _drive_safetensors(path))


@pytest.mark.parametrize("text", [
    b"[" * 100_000 + b"]" * 100_000,  # nesting deeper than Python's recursion limit
    b'{"a": {"dtype": "F32", "shape": [' + b"1" * 4400 + b'], "data_offsets": [0, 4]}}',  # int over 4300 digits
    b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, Infinity]}}',
    b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [false, true]}}',  # JSON booleans are not offsets
    b"\xff\xfe{}",  # not UTF-8
    "{\"\u00e9\": 1}".encode("utf-16-le"),  # JSON in another encoding
])
def test_safetensors_reader_on_hostile_json(tmp_path, text):
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(8))
    with bounded(), pytest.raises(KilnError, match="hostile.safetensors"):
        _drive_safetensors(path)


def test_safetensors_huge_header_length_does_not_allocate(seeds, tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**60) + seeds["safetensors"][8:])
    with bounded(), pytest.raises(KilnError, match="corrupt safetensors header"):
        _drive_safetensors(path)


# ----------------------------------------------------------------------------- imatrix GGUF

def test_imatrix_gguf_reads_through_the_one_reader(tmp_path):
    """llama-imatrix's GGUF layout (`<tensor>.in_sum2` [n_mat, n_per_row] and `<tensor>.counts` [n_mat, 1],
    float32) gives per-column sums over counts, 1.0 where a matrix saw no tokens; a cut copy gets
    the GGUF reader's message."""
    from gguf import GGUFWriter

    sums = np.arange(2 * 8, dtype=np.float32).reshape(2, 8) + 1
    counts = np.array([[4.0], [0.0]], dtype=np.float32)
    path = tmp_path / "imatrix.gguf"
    w = GGUFWriter(str(path), "imatrix")
    w.add_string("general.type", "imatrix")
    w.add_tensor("blk.0.ffn_down.weight.in_sum2", sums)
    w.add_tensor("blk.0.ffn_down.weight.counts", counts)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    values = read_imatrix(path)
    assert list(values) == ["blk.0.ffn_down.weight"]
    expected = np.concatenate([sums[0] / 4, np.ones(8, np.float32)])
    assert values["blk.0.ffn_down.weight"].dtype == np.float32
    np.testing.assert_array_equal(values["blk.0.ffn_down.weight"], expected)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-40])  # into the data (the last 24 bytes are alignment padding)
    with pytest.raises(KilnError, match=r"cut\.gguf: not a valid GGUF file \(.*runs past the end of the file"):
        read_imatrix(cut)


def test_vocabulary_longer_than_one_read_block(tmp_path):
    """String arrays are walked in 1 MiB blocks: a 200k-token vocabulary (about 3 MB, like Qwen's
    152k) crosses block boundaries mid-length-field and reads back exactly; cut inside, it is refused."""
    from gguf import GGUFWriter

    tokens = [f"t{i}" + "x" * (i % 13) for i in range(200_000)]
    path = tmp_path / "vocab.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_token_list(tokens)
    w.add_uint32("after.vocab", 7)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    g = open_gguf(path)
    assert g.array_len("tokenizer.ggml.tokens") == len(tokens)
    assert g.get("tokenizer.ggml.tokens") == tokens and g.get("after.vocab") == 7
    assert read_header(path, ["tokenizer.ggml.tokens"])["tokenizer.ggml.tokens"][-1] == tokens[-1].encode()
    data = path.read_bytes()
    for keep in ((1 << 20) + 3, (2 << 20) + 5, data.index(b"after.vocab") - 8 - 3):  # the last inside the last token
        cut = tmp_path / "cut.gguf"
        cut.write_bytes(data[:keep])
        with pytest.raises(KilnError, match="key 'tokenizer.ggml.tokens' runs past the end of the file"):
            open_gguf(cut)
