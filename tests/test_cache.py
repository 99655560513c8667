"""Latent/text cache on disk: a second run encodes nothing, a changed image or caption is encoded again, nothing else."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from klein_lora_studio.tests.helpers import concept_image, write_concept_dataset
from klein_lora_studio.trainer.data import cache as ch


class CountingVAE:
    """The real tiny VAE, counting encode calls."""

    def __init__(self, vae):
        self.vae, self.calls = vae, 0

    def encode(self, pixels):
        self.calls += 1
        return self.vae.encode(pixels)

    def __getattr__(self, name):
        return getattr(self.vae, name)


class CountingCLIP:
    def __init__(self, clip):
        self.clip, self.calls = clip, 0

    def encode_from_tokens_scheduled(self, tokens):
        self.calls += 1
        return self.clip.encode_from_tokens_scheduled(tokens)

    def __getattr__(self, name):
        return getattr(self.clip, name)


def test_module_identity_follows_the_weights():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 8))
    b = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 8))
    b.load_state_dict(a.state_dict())
    assert ch.module_identity(a) == ch.module_identity(b)
    with torch.no_grad():
        b[0].weight.add_(torch.randn_like(b[0].weight) * 1e-3)  # a fine-tune moves every weight a little
    assert ch.module_identity(a) != ch.module_identity(b)
    patch = {"0.weight": [(1.0, (torch.ones(64, 4), torch.ones(4, 32)), 1.0, None, None)]}
    assert ch.module_identity(a, patch) != ch.module_identity(a)


def test_file_digest_is_content_only(tmp_path):
    (tmp_path / "a.png").write_bytes(b"same")
    (tmp_path / "b.png").write_bytes(b"same")
    assert ch.file_digest(tmp_path / "a.png") == ch.file_digest(tmp_path / "b.png")


@pytest.mark.comfy
def test_second_run_reencodes_only_what_changed(tiny, tmp_path):
    folder = write_concept_dataset(tmp_path / "data", n=3, size=64)
    for i in range(3):  # one shared caption: the text encoder is the slow part on CPU (~3 s a caption)
        (folder / f"{i:03d}.txt").write_text("a picture", encoding="utf-8")
    cache_dir = tmp_path / "cache"
    vae, clip = CountingVAE(tiny.vae), CountingCLIP(tiny.clip)
    with torch.inference_mode():
        first = ch.encode_folder_cached(folder, vae, clip, 64, "zxq", cache_dir)
        assert (vae.calls, clip.calls) == (3, 1)  # the shared caption is encoded once

        again = ch.encode_folder_cached(folder, vae, clip, 64, "zxq", cache_dir)
        assert (vae.calls, clip.calls) == (3, 1), "a second run must encode nothing"
        assert all(torch.equal(a, b) for a, b in zip(first.latents, again.latents, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(first.contexts, again.contexts, strict=True))
        assert "3 latent(s) reused, 0 encoded" in again.report()

        img = np.asarray(concept_image(64, 99))  # change one image's content (same name)
        from PIL import Image
        Image.fromarray(img).save(folder / "001.png")
        (folder / "002.txt").write_text("a new caption", encoding="utf-8")
        third = ch.encode_folder_cached(folder, vae, clip, 64, "zxq", cache_dir)
        assert (vae.calls, clip.calls) == (4, 2), "only the changed image and the changed caption are encoded"
        assert not torch.equal(third.latents[1], first.latents[1])
        assert torch.equal(third.latents[0], first.latents[0])

        ch.encode_folder_cached(folder, vae, clip, 128, "zxq", cache_dir)  # another resolution: other latents
        assert (vae.calls, clip.calls) == (7, 2)

    broken = next((cache_dir / "latents").rglob("*.safetensors"))
    broken.write_bytes(b"not safetensors")
    with torch.inference_mode():
        ch.encode_folder_cached(folder, vae, clip, 64, "zxq", cache_dir)
        ch.encode_folder_cached(folder, vae, clip, 128, "zxq", cache_dir)
    assert vae.calls == 8, "an unreadable entry is encoded again (once), not trusted"
    assert not list(cache_dir.rglob("*.tmp-*"))


def test_module_identity_of_a_tensor_whose_last_index_float32_rounds_up():
    """2**25 + 4 elements: the last index, 2**25 + 3, is 2**25 + 4 in float32 (spacing 4 there), one past the end;
    the first real-size run (Qwen3-4B's 388,956,160-element embedding) failed there with an IndexError. The last
    element is sampled: changing it changes the identity."""
    n = 2**25 + 4
    assert int(torch.tensor(float(n - 1), dtype=torch.float32).item()) == n  # the rounding the fix avoids
    module = torch.nn.Module()
    module.register_buffer("big", torch.zeros(n, dtype=torch.uint8))
    before = ch.module_identity(module)
    module.big[-1] = 1
    assert ch.module_identity(module) != before
