"""Tiny NeMo models built from config with random weights, for CPU tests and benchmarks (no model hub needed).

They go through the same ``save_to`` / ``restore_from`` / ``transcribe`` calls as real checkpoints: a
char-CTC ConvASR (~0.2 MB), char RNNT / TDT / hybrid RNNT-CTC variants of it, and a FastPitch + HiFi-GAN pair
with a character tokenizer. ``train_char_ctc`` fits the CTC model to a few clips in seconds, enough to prove
that an audio path (resampling, features, decoding) is wired right. NeMo is imported inside each function.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

CHAR_LABELS = list(" abcdefghijklmnopqrstuvwxyz'")

_ASR_PREPROCESSOR = {
    "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
    "sample_rate": 16000,
    "normalize": "per_feature",
    "window_size": 0.025,
    "window_stride": 0.01,
    "features": 64,
    "n_fft": 512,
    "dither": 0.0,
    "pad_to": 0,
}


def _block(filters: int, kernel: int, stride: int = 1, residual: bool = True) -> dict[str, Any]:
    return {
        "filters": filters,
        "repeat": 1,
        "kernel": [kernel],
        "stride": [stride],
        "dilation": [1],
        "dropout": 0.0,
        "residual": residual,
        "separable": True,
    }


def char_ctc_config(filters: int = 96, blocks: int = 3) -> dict[str, Any]:
    """A ConvASR (QuartzNet-like) char-CTC model: 2x time subsampling, ``blocks`` residual blocks."""
    jasper = [_block(filters, 11, stride=2, residual=False)]
    jasper += [_block(filters, 13) for _ in range(blocks)]
    jasper.append(_block(filters, 1, residual=False))
    return {
        "sample_rate": 16000,
        "labels": CHAR_LABELS,
        "train_ds": None,
        "validation_ds": None,
        "test_ds": None,
        "optim": None,
        "preprocessor": dict(_ASR_PREPROCESSOR),
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConvASREncoder",
            "feat_in": 64,
            "activation": "relu",
            "conv_mask": True,
            "jasper": jasper,
        },
        "decoder": {
            "_target_": "nemo.collections.asr.modules.ConvASRDecoder",
            "feat_in": filters,
            "num_classes": len(CHAR_LABELS),
            "vocabulary": CHAR_LABELS,
        },
        "decoding": {"strategy": "greedy"},
    }


def char_rnnt_config(kind: str = "rnnt", filters: int = 64) -> dict[str, Any]:
    """Char RNNT (``kind='rnnt'``), TDT (``'tdt'``) or hybrid RNNT+CTC (``'hybrid'``) over a small ConvASR."""
    cfg = char_ctc_config(filters=filters, blocks=1)
    del cfg["decoder"]
    cfg["model_defaults"] = {"enc_hidden": filters, "pred_hidden": 32}
    cfg["decoder"] = {
        "_target_": "nemo.collections.asr.modules.RNNTDecoder",
        "normalization_mode": None,
        "random_state_sampling": False,
        "blank_as_pad": True,
        "prednet": {"pred_hidden": 32, "pred_rnn_layers": 1, "t_max": None, "dropout": 0.0},
    }
    cfg["joint"] = {
        "_target_": "nemo.collections.asr.modules.RNNTJoint",
        "log_softmax": None,
        "preserve_memory": False,
        "fuse_loss_wer": False,
        "jointnet": {
            "joint_hidden": 32,
            "activation": "relu",
            "dropout": 0.0,
            "encoder_hidden": filters,
            "pred_hidden": 32,
        },
    }
    cfg["decoding"] = {"strategy": "greedy_batch", "greedy": {"max_symbols": 5}}
    if kind == "tdt":
        durations = [0, 1, 2, 3, 4]
        cfg["model_defaults"]["tdt_durations"] = durations
        cfg["joint"]["num_extra_outputs"] = len(durations)
        cfg["decoding"].update(model_type="tdt", durations=durations)
        cfg["loss"] = {
            "loss_name": "tdt",
            "tdt_kwargs": {"durations": durations, "sigma": 0.02, "omega": 0.1},
        }
    elif kind == "hybrid":
        cfg["aux_ctc"] = {
            "ctc_loss_weight": 0.3,
            "decoder": {
                "_target_": "nemo.collections.asr.modules.ConvASRDecoder",
                "feat_in": filters,
                "num_classes": len(CHAR_LABELS),
                "vocabulary": CHAR_LABELS,
            },
            "decoding": {"strategy": "greedy"},
        }
    elif kind != "rnnt":
        raise ValueError(f"unknown kind {kind!r}: rnnt, tdt or hybrid")
    return cfg


def fastconformer_ctc_config(d_model: int = 512, layers: int = 17, heads: int = 8) -> dict[str, Any]:
    """A char-CTC FastConformer (8x depthwise-striding subsampling), the encoder family of Parakeet.

    With the defaults it has ~115M parameters: a stand-in of realistic cost for GPU benchmarks when no
    real checkpoint is at hand (random weights: its throughput means something, its text does not).
    """
    cfg = char_ctc_config()
    cfg["preprocessor"]["features"] = 80
    cfg["encoder"] = {
        "_target_": "nemo.collections.asr.modules.ConformerEncoder",
        "feat_in": 80,
        "feat_out": -1,
        "n_layers": layers,
        "d_model": d_model,
        "subsampling": "dw_striding",
        "subsampling_factor": 8,
        "subsampling_conv_channels": min(d_model, 256),
        "causal_downsampling": False,
        "ff_expansion_factor": 4,
        "self_attention_model": "rel_pos",
        "n_heads": heads,
        "att_context_size": [-1, -1],
        "xscaling": True,
        "untie_biases": True,
        "pos_emb_max_len": 5000,
        "conv_kernel_size": 9,
        "conv_norm_type": "batch_norm",
        "dropout": 0.0,
        "dropout_pre_encoder": 0.0,
        "dropout_emb": 0.0,
        "dropout_att": 0.0,
    }
    cfg["decoder"]["feat_in"] = d_model
    return cfg


def build_asr(kind: str = "ctc", **kwargs: Any) -> Any:
    """A NeMo ASR model of ``kind`` (ctc, rnnt, tdt, hybrid, fastconformer) with random weights."""
    from omegaconf import OmegaConf

    if kind in ("ctc", "fastconformer"):
        from nemo.collections.asr.models import EncDecCTCModel

        config = char_ctc_config(**kwargs) if kind == "ctc" else fastconformer_ctc_config(**kwargs)
        return EncDecCTCModel(cfg=OmegaConf.create(config))
    cfg = OmegaConf.create(char_rnnt_config(kind, **kwargs))
    if kind == "hybrid":
        from nemo.collections.asr.models import EncDecHybridRNNTCTCModel

        return EncDecHybridRNNTCTCModel(cfg=cfg)
    from nemo.collections.asr.models import EncDecRNNTModel

    return EncDecRNNTModel(cfg=cfg)


def save_asr(path: str | Path, kind: str = "ctc", **kwargs: Any) -> Path:
    path = Path(path)
    build_asr(kind, **kwargs).save_to(str(path))
    return path


def train_char_ctc(
    model: Any,
    clips: Sequence[np.ndarray],
    texts: Sequence[str],
    *,
    steps: int = 400,
    lr: float = 3e-3,
    seed: int = 0,
    threads: int | None = 1,
) -> list[float]:
    """Fit a char-CTC model to ``clips`` (16 kHz float32) and their ``texts``; returns the loss curve.

    ``threads`` caps torch's intra-op threads while training (restored afterwards): a model this small
    spends more time synchronizing threads than computing, many times more on a busy machine.

    Each step is one batch of all clips with a random gain, random leading and trailing silence and faint
    noise, so the model learns the words rather than the exact sample positions or the clip edges. Plain torch (no Lightning trainer): seconds on 2 cores.
    """
    import torch

    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train(model, clips, texts, steps=steps, lr=lr, seed=seed)
    finally:
        torch.set_num_threads(previous_threads)


def _train(
    model: Any, clips: Sequence[np.ndarray], texts: Sequence[str], *, steps: int, lr: float, seed: int
) -> list[float]:
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    index = {c: i for i, c in enumerate(model.decoder.vocabulary)}
    targets = [torch.tensor([index[c] for c in t.lower() if c in index], dtype=torch.long) for t in texts]
    target_lens = torch.tensor([len(t) for t in targets])
    target_batch = torch.nn.utils.rnn.pad_sequence(targets, batch_first=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    losses: list[float] = []
    # Up to 0.5 s of silence before and 1 s after: inference pads short clips and streaming segments end
    # with the pause that closed them.
    lead, tail = 8000, 16000
    longest = max(len(c) for c in clips) + lead + tail
    for _ in range(steps):
        batch = torch.from_numpy(rng.standard_normal((len(clips), longest)).astype(np.float32) * 1e-3)
        lens = torch.zeros(len(clips), dtype=torch.long)
        for i, clip in enumerate(clips):
            shift = int(rng.integers(0, lead))
            gain = float(rng.uniform(0.5, 1.5))
            batch[i, shift : shift + len(clip)] += torch.from_numpy(np.asarray(clip, dtype=np.float32) * gain)
            lens[i] = shift + len(clip) + int(rng.integers(0, tail))
        log_probs, enc_lens, _ = model.forward(input_signal=batch, input_signal_length=lens)
        loss = model.loss(
            log_probs=log_probs, targets=target_batch, input_lengths=enc_lens, target_lengths=target_lens
        )
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


# ----- TTS ----------------------------------------------------------------------------------------

_MEL = {"sample_rate": 22050, "n_fft": 1024, "n_window_size": 1024, "n_window_stride": 256, "features": 80}


def fastpitch_config(n_speakers: int = 1, dim: int = 32) -> dict[str, Any]:
    """A tiny FastPitch with a character tokenizer (learned alignment, as the published checkpoints)."""
    preprocessor = {
        "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
        "features": _MEL["features"],
        "lowfreq": 0,
        "highfreq": 8000,
        "n_fft": _MEL["n_fft"],
        "n_window_size": _MEL["n_window_size"],
        "window_size": False,
        "n_window_stride": _MEL["n_window_stride"],
        "window_stride": False,
        "pad_to": 1,
        "pad_value": 0,
        "sample_rate": _MEL["sample_rate"],
        "window": "hann",
        "normalize": None,
        "preemph": None,
        "dither": 0.0,
        "frame_splicing": 1,
        "log": True,
        "log_zero_guard_type": "add",
        "log_zero_guard_value": 1e-05,
        "mag_power": 1.0,
    }
    fft = {
        "n_layer": 1,
        "n_head": 1,
        "d_model": dim,
        "d_head": 16,
        "d_inner": 2 * dim,
        "kernel_size": 3,
        "dropout": 0.0,
        "dropatt": 0.0,
        "dropemb": 0.0,
    }
    predictor = {
        "_target_": "nemo.collections.tts.modules.fastpitch.TemporalPredictor",
        "input_size": dim,
        "kernel_size": 3,
        "filter_size": dim,
        "dropout": 0.0,
        "n_layers": 1,
    }
    return {
        "sample_rate": _MEL["sample_rate"],
        "n_mel_channels": _MEL["features"],
        "n_window_size": _MEL["n_window_size"],
        "n_window_stride": _MEL["n_window_stride"],
        "n_fft": _MEL["n_fft"],
        "learn_alignment": True,
        "n_speakers": n_speakers,
        "max_token_duration": 75,
        "symbols_embedding_dim": dim,
        "pitch_embedding_kernel_size": 3,
        "pitch_mean": 212.0,
        "pitch_std": 68.0,
        "text_tokenizer": {
            "_target_": "nemo.collections.common.tokenizers.text_to_speech.tts_tokenizers.EnglishCharsTokenizer",
            "punct": True,
            "apostrophe": True,
            "pad_with_space": True,
        },
        # The dataset class only tells FastPitch which tokenizer path to take; nothing is loaded.
        "train_ds": {
            "defer_setup": True,
            "dataset": {"_target_": "nemo.collections.tts.data.dataset.TTSDataset"},
        },
        "validation_ds": None,
        "optim": None,
        "preprocessor": preprocessor,
        "input_fft": {
            "_target_": "nemo.collections.tts.modules.transformer.FFTransformerEncoder",
            **fft,
            "d_embed": dim,
        },
        "output_fft": {"_target_": "nemo.collections.tts.modules.transformer.FFTransformerDecoder", **fft},
        "alignment_module": {
            "_target_": "nemo.collections.tts.modules.aligner.AlignmentEncoder",
            "n_text_channels": dim,
        },
        "duration_predictor": dict(predictor),
        "pitch_predictor": dict(predictor),
    }


def hifigan_config() -> dict[str, Any]:
    """A tiny HiFi-GAN generator (hop 256 = 8*8*2*2) matching ``fastpitch_config``'s mels."""
    preprocessor = {
        "_target_": "nemo.collections.asr.parts.preprocessing.features.FilterbankFeatures",
        "nfilt": _MEL["features"],
        "lowfreq": 0,
        "highfreq": 8000,
        "n_fft": _MEL["n_fft"],
        "n_window_size": _MEL["n_window_size"],
        "n_window_stride": _MEL["n_window_stride"],
        "pad_to": 0,
        "pad_value": -11.52,
        "sample_rate": _MEL["sample_rate"],
        "window": "hann",
        "normalize": None,
        "preemph": None,
        "dither": 0.0,
        "frame_splicing": 1,
        "log": True,
        "log_zero_guard_type": "clamp",
        "log_zero_guard_value": 1e-05,
        "mag_power": 1.0,
        "use_grads": False,
        "exact_pad": True,
    }
    return {
        "preprocessor": preprocessor,
        "train_ds": {
            "defer_setup": True,
            "dataset": {"_target_": "nemo.collections.tts.data.dataset.VocoderDataset"},
        },
        "validation_ds": None,
        "optim": None,
        "generator": {
            "_target_": "nemo.collections.tts.modules.hifigan_modules.Generator",
            "resblock": 1,
            "upsample_rates": [8, 8, 2, 2],
            "upsample_kernel_sizes": [16, 16, 4, 4],
            "upsample_initial_channel": 32,
            "resblock_kernel_sizes": [3],
            "resblock_dilation_sizes": [[1, 3, 5]],
        },
    }


def save_tts(directory: str | Path, n_speakers: int = 1, frames_per_token: float = 4.0) -> tuple[Path, Path]:
    """Write ``fastpitch.nemo`` and ``hifigan.nemo`` into ``directory``; returns their paths.

    Random duration predictors emit ~0 frames per token; biasing them to ``frames_per_token`` makes the
    output length follow the text length like a trained model's. HiFi-GAN's 70M-parameter discriminators
    (training only) are dropped so the file stays small; restore it with ``strict=False``.
    """
    import torch
    from nemo.collections.tts.models import FastPitchModel, HifiGanModel
    from omegaconf import OmegaConf

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spec_gen = FastPitchModel(cfg=OmegaConf.create(fastpitch_config(n_speakers=n_speakers)))
    with torch.no_grad():
        last = spec_gen.fastpitch.duration_predictor.fc
        last.weight.mul_(0.01)
        last.bias.fill_(math.log(frames_per_token + 1.0))
    vocoder = HifiGanModel(cfg=OmegaConf.create(hifigan_config()))
    del vocoder.mpd, vocoder.msd
    fp_path, voc_path = directory / "fastpitch.nemo", directory / "hifigan.nemo"
    spec_gen.save_to(str(fp_path))
    vocoder.save_to(str(voc_path))
    return fp_path, voc_path
