"""Calibration and `eval` of speech models, on rows naming WAV files: a wav2vec2 classifier, a
wav2vec2 CTC recognizer (one prediction per frame of the sound) and a Whisper (the transcript it
generates). The record's counts and eval's are checked against counts made here one sound at a
time, without padding, and the WAV reader against samples written here."""

from __future__ import annotations

import json
import struct
import wave

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_calibrated import _eval_agrees, _greedy_counts, _jsonl

import modelstore
from modelstore.cli import main
from modelstore.fidelity.data import load_audio
from modelstore.fidelity.runner import encode

RATE = 16000
#: a wav2vec2 of two layers whose feature extractor gives an attention mask, so padding is masked
W2V = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, conv_dim=(8, 8),
           conv_stride=(4, 4), conv_kernel=(8, 8), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
           feat_extract_norm="layer")


def _write_wav(path, samples: np.ndarray, rate: int = RATE, width: int = 2) -> None:
    """`samples` ([n] or [n, channels] in [-1, 1]) as integer PCM of `width` bytes (stdlib wave)."""
    x = samples[:, None] if samples.ndim == 1 else samples
    ints = (x * 127 + 128).astype("u1") if width == 1 else (x * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(x.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(ints.tobytes())


def _sounds(folder, n: int) -> list[str]:
    """`n` WAV files of different lengths (0.1-0.15 s) under `folder`; their names."""
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        t = np.arange(1600 + 160 * (i % 4))
        tone = np.sin(t * rng.uniform(0.005, 0.5)) * rng.uniform(0.05, 0.6)
        _write_wav(folder / f"{i}.wav", np.clip(tone + rng.normal(0, rng.uniform(0.01, 0.3), len(t)), -1, 1))
        names.append(f"{folder.name}/{i}.wav")
    return names


def _calibrated(m, fe, tmp_path, scale: float, task: str, n: int = 12) -> tuple[str, str, dict, list[str]]:
    """`m` (with feature extractor `fe`) saved as the pre-trained model and, every matrix and conv
    kernel moved by noise of `scale`, as its fine-tune, added to a store of the first calibrated at
    agreement 0.9 on `n` sounds. Returns (store url, calibration file, fidelity record, sounds' paths)."""
    g = torch.Generator().manual_seed(1)
    for name in ("pre", "ft"):
        if name == "ft":
            with torch.no_grad():
                for v in m.state_dict().values():
                    if v.dtype.is_floating_point and v.dim() >= 2:
                        v.add_(torch.randn(v.shape, generator=g) * scale)
        m.save_pretrained(tmp_path / name)
        fe.save_pretrained(tmp_path / name)
    names = _sounds(tmp_path / "wav", n)
    cal = _jsonl(tmp_path / "c.jsonl", [{"audio": a} for a in names])
    url = str(tmp_path / "s")
    modelstore.init(url, str(tmp_path / "pre"))
    f = modelstore.open(url, mode="a").add_task(task, str(tmp_path / "ft"), calibration=cal, min_agreement=0.9)
    return url, cal, f["fidelity"], [str(tmp_path / a) for a in names]


def _alone(fe, path: str) -> dict:
    """One sound's features, made by the feature extractor alone (no other sound, no padding)."""
    return fe(load_audio(path, RATE), sampling_rate=RATE, return_tensors="pt")


def _wav2vec2(cls, tmp_path, scale: float, task: str, output: str, **cfg):
    """A tiny wav2vec2 (or WavLM) `cls` (with `cfg`) _calibrated as task `task`, its record's output `output`
    and its choice lossy: (store url, calibration file, record, sounds, original, stored task, feature
    extractor)."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, WavLMConfig
    torch.manual_seed(0)
    fe = Wav2Vec2FeatureExtractor(return_attention_mask=True)
    config = WavLMConfig if cls.__name__.startswith("WavLM") else Wav2Vec2Config
    url, cal, f, paths = _calibrated(cls(config(**cfg, **W2V)).eval(), fe, tmp_path, scale, task)
    assert f["output"] == output and f["setting"]["kind"] == "fft" and 0.9 <= f["agreement"] < 1, f
    ref, stored = cls.from_pretrained(tmp_path / "ft").eval(), modelstore.load_model(task, url, dtype=torch.float32)
    return url, cal, f, paths, ref, stored, fe


def test_a_speech_classifier_is_calibrated_and_evaluated_sound_by_sound(tmp_path):
    """One prediction per sound: the record's agreement (a lossy choice) and eval's are what each
    sound run alone gives, though the batches pad the shorter sounds."""
    from transformers import Wav2Vec2ForSequenceClassification
    url, cal, f, paths, ref, stored, fe = _wav2vec2(Wav2Vec2ForSequenceClassification, tmp_path, 0.02, "kws",
                                                    "classification", num_labels=4)
    with torch.no_grad():
        agree = sum(int(ref(**_alone(fe, p)).logits.argmax() == stored(**_alone(fe, p)).logits.argmax()) for p in paths)
    assert f["predictions"] == len(paths) and abs(f["agreement"] - agree / len(paths)) <= 1 / len(paths)
    r = CliRunner().invoke(main, ["eval", url, "kws", "--original", str(tmp_path / "ft"), "--data", cal, "--json"])
    got = json.loads(r.output)
    assert got["kind"] == "classification" and got["examples"] == len(paths)
    assert got["agreement"] == pytest.approx(agree / len(paths), abs=1 / len(paths))


def test_a_ctc_recognizer_agrees_frame_by_frame_on_the_frames_of_each_sound(tmp_path):
    """A CTC model predicts a character or blank per frame: the record counts the frames of each
    sound, not of its padding, and agrees with the frames run alone; eval's same_transcript counts
    the sounds whose every frame agrees. A sound given as an array of samples is the file's."""
    from transformers import Wav2Vec2ForCTC
    url, cal, f, paths, ref, stored, fe = _wav2vec2(Wav2Vec2ForCTC, tmp_path, 0.005, "asr", "ctc", vocab_size=12)
    frames = agree = same = 0
    with torch.no_grad():
        for p in paths:
            a, b = (x(**_alone(fe, p)).logits[0].argmax(-1) for x in (ref, stored))
            frames, agree, same = frames + len(a), agree + int((a == b).sum()), same + int(torch.equal(a, b))
    assert frames < 2 * len(paths) * max(map(len, (load_audio(p, RATE) for p in paths))) // 16  # not padded frames
    got = _eval_agrees(url, "asr", tmp_path, cal, f, agree, frames)
    assert got["same_transcript"] == pytest.approx(same / len(paths), abs=1 / len(paths))
    line = CliRunner().invoke(main, ["eval", url, "asr", "--original", str(tmp_path / "ft"), "--data", cal]).output
    assert f"over {frames} frames of {len(paths)} sounds, the same transcript for" in line, line
    arrays = [load_audio(p, RATE) for p in paths[:3]]
    as_files, as_arrays = (encode(fe, "ctc", [], None, 256, 0, audio=x) for x in (paths[:3], arrays))
    assert as_files.keys() == as_arrays.keys() and all(torch.equal(as_files[k], as_arrays[k]) for k in as_files)


def test_an_audio_frame_classifier_agrees_frame_by_frame(tmp_path):
    """An audio frame classifier (a diarization model's head): one prediction per frame of each
    sound, not of its padding, counted here with each sound run alone."""
    from transformers import Wav2Vec2ForAudioFrameClassification
    url, cal, f, paths, ref, stored, fe = _wav2vec2(Wav2Vec2ForAudioFrameClassification, tmp_path, 0.005, "dia",
                                                    "frame-classification", num_labels=3)
    frames = agree = 0
    with torch.no_grad():
        for p in paths:
            a, b = (x(**_alone(fe, p)).logits[0].argmax(-1) for x in (ref, stored))
            frames, agree = frames + len(a), agree + int((a == b).sum())
    got = _eval_agrees(url, "dia", tmp_path, cal, f, agree, frames)
    line = CliRunner().invoke(main, ["eval", url, "dia", "--original", str(tmp_path / "ft"), "--data", cal]).output
    assert f"over {frames} frames of {len(paths)} sounds" in line and got["kind"] == "frame-classification", line


@pytest.mark.parametrize("cls, output, scale, cfg", [
    ("Wav2Vec2Model", "last_hidden_state", 0.01, {}),
    ("WavLMForXVector", "embeddings", 0.002, dict(xvector_output_dim=16, tdnn_dim=(16, 16), tdnn_kernel=(3, 1),
                                                  tdnn_dilation=(1, 1)))])
def test_a_speech_embedding_model_agrees_on_each_sounds_nearest_neighbour(tmp_path, cls, output, scale, cfg):
    """A bare wav2vec2 embeds a sound as the mean of its frames, the frames of its padding left
    out; a speaker model (x-vectors) as its own embedding: the record and eval count the nearest
    neighbours those make here of each sound run alone."""
    import transformers
    url, cal, f, paths, ref, stored, fe = _wav2vec2(getattr(transformers, cls), tmp_path, scale, "emb", "embedding",
                                                    **cfg)

    def embedding(model, path: str) -> torch.Tensor:
        e = getattr(model(**_alone(fe, path)), output)[0].double()
        return torch.nn.functional.normalize(e.mean(0) if e.dim() == 2 else e, dim=0)  # frames [T, H]: their mean

    with torch.no_grad():
        e, s = (torch.stack([embedding(x, p) for p in paths]) for x in (ref, stored))
    own = torch.eye(len(paths), dtype=torch.bool)
    agree = int(((e @ e.T).masked_fill(own, -2).argmax(1) == (s @ e.T).masked_fill(own, -2).argmax(1)).sum())
    assert f["predictions"] == len(paths)
    got = _eval_agrees(url, "emb", tmp_path, cal, f, agree, len(paths))
    assert got["mean_cosine"] == pytest.approx(float((e * s).sum(1).mean()), abs=1e-5)


def test_a_whisper_is_calibrated_on_the_transcript_it_generates(tmp_path):
    """A Whisper fine-tune: the original's greedy transcript of each sound is the reference,
    compared token by token; counted here by generating and teacher forcing one sound at a time."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration
    torch.manual_seed(0)
    m = WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37, num_mel_bins=16, max_source_positions=1500,
        max_target_positions=64, decoder_start_token_id=1, eos_token_id=2, pad_token_id=0, bos_token_id=1)).eval()
    fe = WhisperFeatureExtractor(feature_size=16)
    url, cal, f, paths = _calibrated(m, fe, tmp_path, 0.02, "whisper", n=6)
    ref = WhisperForConditionalGeneration.from_pretrained(tmp_path / "ft").eval()
    agree, tokens, same = _greedy_counts(ref, modelstore.load_model("whisper", url, dtype=torch.float32),
                                         [_alone(fe, p) for p in paths], 2)
    assert f["output"] == "seq2seq" and f["predictions"] == tokens and f["setting"]["kind"] == "fft", f
    assert abs(f["agreement"] - agree / tokens) <= 1 / tokens
    r = CliRunner().invoke(main, ["eval", url, "whisper", "--original", str(tmp_path / "ft"), "--data", cal, "--json"])
    got = json.loads(r.output)
    assert got["predictions"] == tokens and got["same_generation"] == same / len(paths)


def test_speech_data_that_cannot_be_read_is_refused_in_one_line(tmp_path):
    """Texts for a speech model, a sound at another sampling rate than its feature extractor's, a
    file that is not WAV, one without samples, one too short for the model: each a one-line error
    naming what to do, and nothing stored (eval likewise)."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForSequenceClassification
    torch.manual_seed(0)
    Wav2Vec2ForSequenceClassification(Wav2Vec2Config(num_labels=3, **W2V)).save_pretrained(tmp_path / "pre")
    Wav2Vec2FeatureExtractor().save_pretrained(tmp_path / "pre")
    _write_wav(tmp_path / "fast.wav", np.zeros(4410), rate=44100)
    (tmp_path / "not.wav").write_bytes(b"ID3 an mp3, say")
    _write_wav(tmp_path / "empty.wav", np.zeros(0))
    _write_wav(tmp_path / "short.wav", np.zeros(5))  # shorter than the first convolution's kernel
    url = str(tmp_path / "s")
    modelstore.init(url, str(tmp_path / "pre"))
    for rows, says in (([{"text": "hello"}], 'reads sound; give its rows "audio" paths'),
                       ([{"audio": "fast.wav"}], "sampled at 44100 Hz"),
                       ([{"audio": "not.wav"}], "not a WAV file"),
                       ([{"audio": "empty.wav"}], "the file holds no samples"),
                       ([{"audio": "short.wav"}], "running the original model on it failed (")):
        cal = _jsonl(tmp_path / "c.jsonl", rows)
        r = CliRunner().invoke(main, ["add-task", url, "t", str(tmp_path / "pre"), "--calibration", cal])
        assert r.exit_code == 1 and says in r.output and r.output.count("\n") == 1, r.output
        assert modelstore.open(url).tasks() == []
    modelstore.open(url, mode="a").add_task("t", str(tmp_path / "pre"))
    r = CliRunner().invoke(main, ["eval", url, "t", "--original", str(tmp_path / "pre"), "--data", cal])
    assert r.exit_code == 1 and "running the models on it failed (" in r.output and r.output.count("\n") == 1, r.output


def _riff(fmt: bytes, data: bytes) -> bytes:
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def test_wav_files_of_each_sample_format_are_read_as_mono_samples(tmp_path):
    """16-bit stereo (channels averaged), 8-bit unsigned, 32-bit float and WAVE_FORMAT_EXTENSIBLE
    files read back as the samples written, scaled to [-1, 1]."""
    rng = np.random.default_rng(1)
    x = rng.uniform(-0.9, 0.9, (500, 2))
    _write_wav(tmp_path / "stereo.wav", x)
    want = ((x * 32767).astype("<i2") / 32768).mean(1)
    np.testing.assert_allclose(load_audio(str(tmp_path / "stereo.wav"), RATE), want, atol=1e-7)
    _write_wav(tmp_path / "u8.wav", x[:, 0], width=1)
    want = ((x[:, 0] * 127 + 128).astype("u1").astype(np.float64) - 128) / 128
    np.testing.assert_allclose(load_audio(str(tmp_path / "u8.wav"), RATE), want, atol=1e-7)
    f32 = x[:, 0].astype("<f4")
    (tmp_path / "f32.wav").write_bytes(_riff(struct.pack("<HHIIHH", 3, 1, RATE, RATE * 4, 4, 32), f32.tobytes()))
    np.testing.assert_array_equal(load_audio(str(tmp_path / "f32.wav"), RATE), f32)
    pcm = (x[:, 1] * 32767).astype("<i2")
    ext = struct.pack("<HHIIHH", 0xFFFE, 1, RATE, RATE * 2, 2, 16) + struct.pack("<HHI", 22, 16, 4) + \
        struct.pack("<H", 1) + bytes(14)  # the sub-format GUID's first two bytes: PCM
    (tmp_path / "ext.wav").write_bytes(_riff(ext, pcm.tobytes()))
    np.testing.assert_allclose(load_audio(str(tmp_path / "ext.wav"), RATE), pcm / 32768, atol=1e-7)
