import json

import pytest
import torch
import torch.nn.functional as F

from m4v.vae import (
    CausalVAE3D,
    CausalVAE3DConfig,
    DiffusersVideoVAE,
    PixelLatent,
    load_codec,
    vae_loss,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # Small convolutions gain nothing from a second thread, and on a shared machine the OpenMP
    # barrier of an oversubscribed second thread costs more than the work.
    torch.set_num_threads(1)


def _video(b, t, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, h, w, generator=g) * 2 - 1


# --- PixelLatent --------------------------------------------------------------------------------


def test_pixel_latent_shapes_and_exact_round_trip():
    codec = PixelLatent()
    video = _video(2, 8, 32, 32)
    z = codec.encode(video)
    assert z.shape == (2, 12, 8, 16, 16)
    assert (codec.latent_channels, codec.spatial_factor, codec.temporal_factor) == (12, 2, 1)
    assert torch.equal(codec.decode(z), video)


def test_pixel_latent_matches_per_frame_space_to_depth():
    # Independent reference: each latent cell holds its 2x2 pixel block, channel-major.
    codec = PixelLatent(factor=2, scale=0.5, shift=0.25)
    video = _video(1, 3, 4, 6)
    z = codec.encode(video)
    for t in range(3):
        for y in range(2):
            for x in range(3):
                block = video[0, :, t, 2 * y : 2 * y + 2, 2 * x : 2 * x + 2].reshape(-1)
                torch.testing.assert_close(z[0, :, t, y, x], (block - 0.25) * 0.5)
    torch.testing.assert_close(codec.decode(z), video)


def test_pixel_latent_rejects_bad_input():
    with pytest.raises(ValueError, match="video"):
        PixelLatent().encode(torch.zeros(1, 3, 2, 31, 32))
    with pytest.raises(ValueError, match="latent"):
        PixelLatent().decode(torch.zeros(1, 3, 2, 16, 16))
    with pytest.raises(ValueError, match="factor"):
        PixelLatent(factor=0)


# --- CausalVAE3D --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vae():
    torch.manual_seed(0)
    return CausalVAE3D(CausalVAE3DConfig.preset("tiny")).eval()


@pytest.mark.parametrize("frames,latent_frames", [(1, 1), (9, 2), (17, 3)])
def test_causal_vae_shapes(tiny_vae, frames, latent_frames):
    video = _video(2, frames, 16, 24)
    with torch.no_grad():
        z = tiny_vae.encode(video)
        assert z.shape == (2, 16, latent_frames, 2, 3)
        assert tiny_vae.decode(z).shape == video.shape
    assert (tiny_vae.spatial_factor, tiny_vae.temporal_factor, tiny_vae.latent_channels) == (
        8,
        8,
        16,
    )


def test_causal_vae_encoder_is_causal_and_first_frame_alone(tiny_vae):
    video = _video(1, 17, 16, 16)
    later = video.clone()
    later[:, :, 9:] = _video(1, 8, 16, 16, seed=1)  # frames 9..16 only feed latent frame 2
    with torch.no_grad():
        z, z_later = tiny_vae.encode(video), tiny_vae.encode(later)
        z_first = tiny_vae.encode(video[:, :, :1])
    assert torch.equal(z[:, :, :2], z_later[:, :, :2])
    assert not torch.allclose(z[:, :, 2], z_later[:, :, 2])
    # The first latent frame is the encoding of the first video frame as an image.
    torch.testing.assert_close(z[:, :, :1], z_first, atol=1e-5, rtol=1e-5)


def test_causal_vae_decoder_is_causal(tiny_vae):
    z = torch.randn(1, 16, 3, 2, 2)
    z2 = z.clone()
    z2[:, :, 2] += 1.0
    with torch.no_grad():
        v, v2 = tiny_vae.decode(z), tiny_vae.decode(z2)
    assert torch.equal(v[:, :, :9], v2[:, :, :9])
    assert not torch.allclose(v[:, :, 9:], v2[:, :, 9:])


def test_causal_vae_rejects_bad_input(tiny_vae):
    with pytest.raises(ValueError, match="video: got 8 frames"):
        tiny_vae.encode(_video(1, 8, 16, 16))
    with pytest.raises(ValueError, match="video: got H x W = 12 x 16"):
        tiny_vae.encode(_video(1, 9, 12, 16))
    with pytest.raises(ValueError, match="latent"):
        tiny_vae.decode(torch.zeros(1, 4, 2, 2, 2))
    with pytest.raises(ValueError, match="overlap"):
        tiny_vae.tiled_decode(torch.zeros(1, 16, 2, 2, 2), tile=4, overlap=3)
    with pytest.raises(ValueError, match="widths"):
        CausalVAE3DConfig(widths=())


@pytest.mark.parametrize("chunk", [1, 2])
def test_chunked_decode_equals_plain_decode(tiny_vae, chunk):
    z = torch.randn(1, 16, 4, 2, 3)
    with torch.no_grad():
        plain = tiny_vae.decode(z)
        chunked = tiny_vae.tiled_decode(z, tile=None, chunk=chunk)
    assert chunked.shape == plain.shape == (1, 3, 25, 16, 24)
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 2])
def test_chunked_encode_equals_plain_encode(tiny_vae, chunk):
    video = _video(1, 25, 16, 8)
    with torch.no_grad():
        plain = tiny_vae.encode(video)
        chunked = tiny_vae.encode(video, chunk=chunk)
    assert chunked.shape == plain.shape == (1, 16, 4, 2, 1)
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-5)


def test_chunked_decode_carries_gradients_across_chunks(tiny_vae):
    # Reward fine-tuning backpropagates through chunked decodes: the gradient of a loss on the
    # last frames must reach earlier latent frames exactly as through a plain decode.
    z = torch.randn(1, 16, 3, 1, 2, requires_grad=True)
    (grad_plain,) = torch.autograd.grad(tiny_vae.decode(z)[:, :, -4:].square().sum(), z)
    chunked = tiny_vae.tiled_decode(z, tile=None, chunk=1)
    (grad_chunked,) = torch.autograd.grad(chunked[:, :, -4:].square().sum(), z)
    assert grad_plain[:, :, 1].abs().sum() > 0
    scale = grad_plain.abs().max().item()
    torch.testing.assert_close(grad_chunked, grad_plain, atol=1e-5 * scale, rtol=1e-3)


def test_receptive_radius_bounds_the_influence_of_a_latent_pixel():
    torch.manual_seed(0)
    vae = CausalVAE3D(CausalVAE3DConfig(widths=(8, 8), layers_per_block=1)).eval()
    r, f, n = vae.decoder_receptive_radius, vae.spatial_factor, 2 * vae.decoder_receptive_radius + 6
    z = torch.randn(1, 16, 2, n, n)
    bumped = z.clone()
    bumped[:, :, :, n // 2, n // 2] += 1.0
    with torch.no_grad():
        changed = (vae.decode(bumped) - vae.decode(z)).abs().amax(dim=(0, 1, 2, 4)) > 0
    rows = changed.nonzero().flatten()
    assert rows.min() >= (n // 2 - r) * f and rows.max() < (n // 2 + 1 + r) * f


def test_tiled_chunked_decode_equals_plain_decode_when_overlap_covers_receptive_field():
    # A two-level VAE (2x2x2) keeps the receptive radius (10 latent px) small enough that two
    # tiles per axis, each decoded without seeing the whole latent, fit in a fast test.
    torch.manual_seed(0)
    vae = CausalVAE3D(CausalVAE3DConfig(widths=(8, 8), layers_per_block=1)).eval()
    r = vae.decoder_receptive_radius
    assert r == 10
    z = torch.randn(1, 16, 3, 2 * r + 24, 2 * r + 26)
    with torch.no_grad():
        plain = vae.decode(z)
        exact = vae.tiled_decode(z, tile=4 * r, overlap=2 * r, chunk=2)
        short = vae.tiled_decode(z, tile=4 * r, overlap=4, chunk=2)
    torch.testing.assert_close(exact, plain, atol=1e-5, rtol=1e-5)
    # With too little context the seams differ: the overlap really is what makes it exact.
    assert (short - plain).abs().max() > 1e-3


def test_vae_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    vae = CausalVAE3D(CausalVAE3DConfig.preset("tiny"))
    video = _video(2, 9, 16, 16).clamp(-0.9, 0.9)
    video = F.avg_pool3d(video, (1, 4, 4)).repeat_interleave(4, 3).repeat_interleave(4, 4)
    opt = torch.optim.Adam(vae.parameters(), lr=5e-3)
    losses = []
    for _ in range(15):
        loss, logs = vae_loss(vae, video)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(logs["loss"])
    assert logs["loss"] == pytest.approx(logs["l1"] + vae.config.kl_weight * logs["kl"], rel=1e-5)
    assert logs["psnr"] == pytest.approx(10 * torch.log10(torch.tensor(4.0 / logs["mse"])).item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_latent_scaling_calibration_and_save_load(tmp_path):
    tiny_vae = CausalVAE3D(CausalVAE3DConfig.preset("tiny")).eval()
    video = _video(2, 9, 16, 16)
    scale, shift = tiny_vae.calibrate_latent_scaling([video[:1], video[1:]])
    with torch.no_grad():
        z = tiny_vae.encode(video)
        raw, _ = tiny_vae.posterior(video)
    # Reference: the statistics of the raw posterior means.
    torch.testing.assert_close(
        torch.tensor(shift), raw.mean().double().float(), atol=1e-5, rtol=1e-4
    )
    torch.testing.assert_close(
        torch.tensor(1 / scale), raw.std(unbiased=False), atol=1e-5, rtol=1e-4
    )
    torch.testing.assert_close(z.mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(unbiased=False), torch.tensor(1.0), atol=1e-4, rtol=0)

    tiny_vae.save_pretrained(tmp_path / "vae")
    loaded = load_codec(f"causal3d:{tmp_path / 'vae'}").eval()
    assert loaded.scaling_factor == pytest.approx(scale) and loaded.shift_factor == pytest.approx(
        shift
    )
    with torch.no_grad():
        assert torch.equal(loaded.encode(video), z)
    with pytest.raises(FileNotFoundError, match="config.json and model.safetensors"):
        load_codec(f"causal3d:{tmp_path / 'missing'}")


def test_load_codec_specs():
    assert isinstance(load_codec("pixel"), PixelLatent)
    assert load_codec("pixel:4").latent_channels == 48
    assert load_codec("causal3d-new:tiny").config == CausalVAE3DConfig.preset("tiny")
    for bad in ("", "vqgan:/x", "pixel:two", "causal3d:"):
        with pytest.raises(ValueError, match="spec"):
            load_codec(bad)


# --- DiffusersVideoVAE --------------------------------------------------------------------------


def _tiny_cogvideox():
    from diffusers import AutoencoderKLCogVideoX

    return AutoencoderKLCogVideoX(
        block_out_channels=(8, 8),
        down_block_types=("CogVideoXDownBlock3D",) * 2,
        up_block_types=("CogVideoXUpBlock3D",) * 2,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        temporal_compression_ratio=2,
        scaling_factor=0.7,
    )


def _tiny_wan():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[True],
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[2.0, 1.5, 0.5, 1.0],
    )


def _tiny_ltx():
    from diffusers import AutoencoderKLLTXVideo

    model = AutoencoderKLLTXVideo(
        latent_channels=4,
        block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1),
        spatio_temporal_scaling=(True, False),
        decoder_spatio_temporal_scaling=(True, False),
        decoder_inject_noise=(False, False, False),
        downsample_type=("conv", "conv"),
        upsample_residual=(False, False),
        upsample_factor=(1, 1),
        patch_size=2,
        scaling_factor=0.9,
    )
    with torch.no_grad():
        model.latents_mean.copy_(torch.tensor([0.5, 0.0, -0.5, 0.1]))
        model.latents_std.copy_(torch.tensor([1.0, 2.0, 0.5, 1.0]))
    return model


@pytest.mark.parametrize(
    "build,factors,mean,std,scale",
    [
        (_tiny_cogvideox, (2, 2), [0.0] * 4, [1.0] * 4, 0.7),
        (_tiny_wan, (2, 2), [0.1, -0.2, 0.3, 0.0], [2.0, 1.5, 0.5, 1.0], 1.0),
        (_tiny_ltx, (4, 2), [0.5, 0.0, -0.5, 0.1], [1.0, 2.0, 0.5, 1.0], 0.9),
    ],
    ids=["cogvideox", "wan", "ltx"],
)
def test_diffusers_adapter_matches_the_diffusers_model(tmp_path, build, factors, mean, std, scale):
    torch.manual_seed(0)
    model = build().eval()
    model.save_pretrained(tmp_path / "vae")
    codec = DiffusersVideoVAE.from_folder(tmp_path)  # pipeline root: finds vae/
    assert (codec.spatial_factor, codec.temporal_factor, codec.latent_channels) == (*factors, 4)
    fs, ft = factors
    video = _video(1, 1 + 2 * ft, 4 * fs, 4 * fs)
    with torch.no_grad():
        z = codec.encode(video)
        # Independent reference: the diffusers model called directly, normalised by hand.
        raw = model.encode(video).latent_dist.mean
        m = torch.tensor(mean).view(1, -1, 1, 1, 1)
        s = torch.tensor(std).view(1, -1, 1, 1, 1)
        torch.testing.assert_close(z, (raw - m) * scale / s, atol=1e-5, rtol=1e-5)
        assert z.shape == (1, 4, 3, 4, 4)
        decoded = codec.decode(z)
        torch.testing.assert_close(decoded, model.decode(raw).sample, atol=1e-5, rtol=1e-5)
    assert decoded.shape == video.shape
    assert load_codec(f"diffusers:{tmp_path / 'vae'}").latent_channels == 4
    with pytest.raises(ValueError, match="video"):
        codec.encode(_video(1, 2, 4 * fs, 4 * fs))


def test_diffusers_adapter_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*config.json"):
        DiffusersVideoVAE.from_folder(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        DiffusersVideoVAE.from_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="_class_name is 'AutoencoderKL'"):
        DiffusersVideoVAE.from_folder(tmp_path)
