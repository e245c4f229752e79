"""The two byte-level promises docs/specifications.md specifies, computed here from that text alone:
the content fingerprint and the DARE keep masks.

Nothing here calls the code under test to build an expected value: the fingerprint is
hashed with ``blake3`` over records written by hand, the masks are drawn with
``hashlib`` and ``torch.Generator``. The golden values are frozen: a change to either
algorithm invalidates every ``taskvec.fingerprint`` recorded in users' registries (or
every DARE composite's reproducibility), so it must be a deliberate break with a
migration note, and these tests make it visible.
"""

from __future__ import annotations

import hashlib
import struct

import blake3
import torch
from safetensors.torch import save_file

from mlflow_taskvec.engine import TaskVector, merge, open_checkpoint

# -- fingerprint -------------------------------------------------------------------------------

# One tensor of each kind the specification mentions, with its raw little-endian bytes
# written out by hand (not taken from torch) so the test also pins the byte order.
FIXED_TENSORS = {
    "layers.0.weight": (torch.tensor([[1.0, -2.0], [0.5, 3.25]]), "F32", "2,2", struct.pack("<4f", 1.0, -2.0, 0.5, 3.25)),
    # bfloat16 is the top half of the float32: 1.0 -> 0x3F80, -0.5 -> 0xBF00
    "layers.0.bias": (torch.tensor([1.0, -0.5], dtype=torch.bfloat16), "BF16", "2", struct.pack("<2H", 0x3F80, 0xBF00)),
    "half": (torch.tensor([0.25], dtype=torch.float16), "F16", "1", struct.pack("<e", 0.25)),
    "position_ids": (torch.tensor([[0, 1, 2]]), "I64", "1,3", struct.pack("<3q", 0, 1, 2)),
    "attn.mask": (torch.tensor([True, False]), "BOOL", "2", b"\x01\x00"),
    "temperature": (torch.tensor(2.5, dtype=torch.float64), "F64", "", struct.pack("<d", 2.5)),  # 0-d: shape ""
    "pruned": (torch.zeros(0, 3), "F32", "0,3", b""),  # empty: blake3 of no bytes
    "ëmbed.wéight": (torch.tensor([7.0]), "F32", "1", struct.pack("<f", 7.0)),  # names are UTF-8
}

# blake3 over the records of FIXED_TENSORS; frozen when the specification was written.
FIXED_FINGERPRINT = "3a01bc00000fb56d0b80a9f2d2882acc070b82f76fb1f6ff968cd82ba6881d81"


def fingerprint_by_the_specification(tensors: dict[str, tuple[str, str, bytes]]) -> str:
    """docs/specifications.md, "Fingerprint": one record ``name NUL dtype NUL shape NUL hex(blake3(bytes)) LF`` per
    tensor, sorted by name, UTF-8, hashed with BLAKE3 (hex)."""
    text = "".join(f"{name}\0{code}\0{shape}\0{blake3.blake3(data).hexdigest()}\n" for name, (code, shape, data) in sorted(tensors.items()))
    return blake3.blake3(text.encode("utf-8")).hexdigest()


def test_the_raw_bytes_written_by_hand_are_what_safetensors_stores(tmp_path):
    path = tmp_path / "fixed.safetensors"
    save_file({name: t for name, (t, _, _, _) in FIXED_TENSORS.items()}, str(path))
    checkpoint = open_checkpoint(path)

    for name, (_, _, _, data) in FIXED_TENSORS.items():
        assert bytes(checkpoint.raw_bytes(name)) == data, name


def test_the_fingerprint_of_a_fixed_checkpoint_is_the_specified_hash_and_the_frozen_golden_value(tmp_path):
    path = tmp_path / "fixed.safetensors"
    save_file({name: t for name, (t, _, _, _) in FIXED_TENSORS.items()}, str(path))

    expected = fingerprint_by_the_specification({name: (code, shape, data) for name, (_, code, shape, data) in FIXED_TENSORS.items()})

    assert open_checkpoint(path).fingerprint(fresh=True) == expected
    assert open_checkpoint({name: t for name, (t, _, _, _) in FIXED_TENSORS.items()}).fingerprint() == expected
    assert expected == FIXED_FINGERPRINT


def test_an_empty_tensor_contributes_the_blake3_of_no_bytes_and_a_scalar_an_empty_shape():
    record_text = "pruned\0F32\x000,3\0" + blake3.blake3(b"").hexdigest() + "\n" + "temperature\0F64\0\0" + blake3.blake3(struct.pack("<d", 2.5)).hexdigest() + "\n"

    checkpoint = open_checkpoint({"temperature": torch.tensor(2.5, dtype=torch.float64), "pruned": torch.zeros(0, 3)})

    assert blake3.blake3(b"").hexdigest() == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    assert checkpoint.fingerprint() == blake3.blake3(record_text.encode("utf-8")).hexdigest()


def test_the_fingerprint_of_a_random_checkpoint_follows_the_specification_whatever_its_layout(tmp_path, hf_dir):
    g = torch.Generator().manual_seed(3)
    state = {
        "z.weight": torch.randn(5, 4, generator=g),
        "a.weight": torch.randn(3, generator=g).bfloat16(),
        "m.steps": torch.randint(0, 100, (2, 2), generator=g),
    }
    records = {name: (code, shape, t.contiguous().view(torch.uint8).numpy().tobytes()) for name, t, code, shape in (
        ("z.weight", state["z.weight"], "F32", "5,4"),
        ("a.weight", state["a.weight"], "BF16", "3"),
        ("m.steps", state["m.steps"], "I64", "2,2"),
    )}
    expected = fingerprint_by_the_specification(records)

    sharded = hf_dir(tmp_path / "sharded", state, num_shards=2)

    assert open_checkpoint(sharded).fingerprint(fresh=True) == expected
    assert open_checkpoint(state).fingerprint() == expected


def test_a_saved_task_vectors_fingerprint_is_the_fingerprint_of_its_tensors(tmp_path):
    base = {"w": torch.tensor([1.0, 2.0, 3.0]), "steps": torch.tensor([4])}
    finetuned = {"w": torch.tensor([1.5, 2.0, 2.0]), "steps": torch.tensor([4])}

    fingerprint = TaskVector.extract(base, finetuned).save(tmp_path / "tv.safetensors")

    delta = struct.pack("<3f", 0.5, 0.0, -1.0)
    assert fingerprint == fingerprint_by_the_specification({"w": ("F32", "3", delta)})


# -- DARE keep masks ---------------------------------------------------------------------------

RANDOM_BLOCK_BY_THE_SPECIFICATION = 2**20


def mask_by_the_specification(seed: int, input_index: int, name: str, numel: int, keep_probability: float) -> torch.Tensor:
    """docs/specifications.md, "DARE masks": per block of 2**20 entries, torch.rand(block length) from a fresh
    torch.Generator seeded with the first 8 bytes (little-endian, top bit cleared) of
    sha256("{seed}\\0{input index}\\0{name}\\0{block}"); an entry is kept where its draw < p."""
    parts = []
    for block, start in enumerate(range(0, numel, RANDOM_BLOCK_BY_THE_SPECIFICATION)):
        text = f"{seed}\0{input_index}\0{name}\0{block}".encode("utf-8")
        generator_seed = int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & (2**63 - 1)
        length = min(RANDOM_BLOCK_BY_THE_SPECIFICATION, numel - start)
        parts.append(torch.rand(length, generator=torch.Generator().manual_seed(generator_seed)) < keep_probability)
    return torch.cat(parts)


def kept_by_a_two_input_dare_merge(name: str, numel: int, seed: int, density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The keep masks of inputs 0 and 1 read back from a real ``dare_linear`` merge: deltas
    1 and 4 on a zero base, weights 1, so each output entry (0, 1/p, 4/p or 5/p) says which inputs kept it."""
    base = {name: torch.zeros(numel)}
    vectors = [TaskVector.extract(base, {name: torch.full((numel,), delta)}) for delta in (1.0, 4.0)]
    out = merge(base, vectors, [1.0, 1.0], method="dare_linear", params={"density": density, "seed": seed})[name] * density
    assert set(out.unique().tolist()) <= {0.0, 1.0, 4.0, 5.0}
    return (out == 1.0) | (out == 5.0), out >= 4.0


# the kept entries of a 16-entry tensor 'w', seed 7, keep probability 0.5; frozen when specified
GOLDEN_KEPT = {
    0: [1, 3, 4, 6, 12, 14],
    1: [0, 1, 6, 7, 10, 11, 13, 14, 15],
}


def test_dare_masks_of_a_merge_are_the_specified_draws():
    first, second = kept_by_a_two_input_dare_merge("layers.0.w", 300, seed=11, density=0.3)

    assert torch.equal(first, mask_by_the_specification(11, 0, "layers.0.w", 300, 0.3))
    assert torch.equal(second, mask_by_the_specification(11, 1, "layers.0.w", 300, 0.3))


def test_dare_masks_of_a_fixed_case_are_the_frozen_golden_masks():
    first, second = kept_by_a_two_input_dare_merge("w", 16, seed=7, density=0.5)

    assert first.nonzero().flatten().tolist() == GOLDEN_KEPT[0]
    assert second.nonzero().flatten().tolist() == GOLDEN_KEPT[1]
    assert mask_by_the_specification(7, 0, "w", 16, 0.5).nonzero().flatten().tolist() == GOLDEN_KEPT[0]


def test_a_dare_mask_beyond_one_block_draws_each_block_from_its_own_generator():
    numel = RANDOM_BLOCK_BY_THE_SPECIFICATION + 37
    first, _ = kept_by_a_two_input_dare_merge("big", numel, seed=3, density=0.6)

    # the 37 entries after the first block: block 1's own generator, seeded from "3\0" "0\0" "big\0" "1"
    block_seed = int.from_bytes(hashlib.sha256("3\x000\x00big\x001".encode("utf-8")).digest()[:8], "little") & (2**63 - 1)
    assert torch.equal(first[RANDOM_BLOCK_BY_THE_SPECIFICATION:], torch.rand(37, generator=torch.Generator().manual_seed(block_seed)) < 0.6)
    assert torch.equal(first, mask_by_the_specification(3, 0, "big", numel, 0.6))
