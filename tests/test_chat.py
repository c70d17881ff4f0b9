"""chat: the merged checkpoint answers as the adapter folder does, sessions keep their images, video
frames, and through the CLI stdout holds the answer lines and nothing else."""

from __future__ import annotations

import subprocess
import sys

from PIL import Image

from internvl_lora.chat import ChatSession, chat_once, interactive
from internvl_lora.infer import build_inputs, generate, image_tiles
from internvl_lora.internvl.constants import IMG_CONTEXT_TOKEN

MAX_NEW = 12


def test_merged_model_answers_like_the_adapter_folder(merged_run):
    questions = ["What color is the shape?", "Describe the image."]
    answers = {}
    for name, loaded in (("adapter", merged_run.adapter_model), ("merged", merged_run.merged_model)):
        answers[name] = [ChatSession(loaded, [img], max_new_tokens=MAX_NEW).ask(q)
                         for img in merged_run.images for q in questions]
    assert answers["adapter"] == answers["merged"]
    assert any(a for a in answers["merged"])


def test_session_keeps_the_images_in_the_history(merged_run):
    loaded = merged_run.merged_model
    img = merged_run.images[0]
    session = ChatSession(loaded, [img], max_new_tokens=MAX_NEW)
    a1 = session.ask("What color is the shape?")
    a2 = session.ask("Are you sure?")
    assert session.history[0] == ("<image>\nWhat color is the shape?", a1)
    ids, pixels = build_inputs("Are you sure?", [img], loaded.settings, loaded.tokenizer,
                               history=[("What color is the shape?", a1)])
    context = loaded.tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    _, counts = image_tiles([img], loaded.settings)
    assert ids.count(context) == counts[0] * loaded.settings.tokens_per_tile  # the image is in turn 1
    assert generate(loaded, [(ids, pixels)], MAX_NEW) == [a2]
    no_image, _ = build_inputs("Are you sure?", [], loaded.settings, loaded.tokenizer,
                               history=[("What color is the shape?", a1)])
    assert no_image.count(context) == 0 and no_image != ids


def test_video_frames(merged_run, tmp_path):
    gif = tmp_path / "clip.gif"
    frames = [Image.new("RGB", (96, 64), (20 * k, 100, 255 - 20 * k)) for k in range(12)]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100)
    session = ChatSession(merged_run.merged_model, video=str(gif), max_new_tokens=4)
    assert len(session.frames) == 8 and session.pixels.shape[0] == 8
    answer = session.ask("What happens?")
    assert isinstance(answer, str)
    assert session.history[0][0].startswith("Frame-1: <image>\nFrame-2: <image>\n")
    assert answer == chat_once(merged_run.merged_model, "What happens?", video=str(gif), max_new_tokens=4)


def test_interactive_reads_one_question_per_line(merged_run):
    import io

    out = io.StringIO()
    turns = interactive(merged_run.merged_model, [merged_run.images[0]], None, MAX_NEW,
                        lines=["What color is the shape?\n", "Are you sure?\n", "\n", "never asked\n"], out=out)
    session = ChatSession(merged_run.merged_model, [merged_run.images[0]], max_new_tokens=MAX_NEW)
    expected = [session.ask("What color is the shape?"), session.ask("Are you sure?")]
    assert turns == 2 and out.getvalue().splitlines() == expected


# ----------------------------------------------------------------------------------------------- CLI


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "internvl_lora.cli", "chat", *args], input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_one_shot_writes_only_the_answer_to_stdout(merged_run, capfd):
    """`run_chat` (what `internvl-lora chat MODEL --image X "question"` runs): the answer and a newline on
    file descriptor 1, loading messages and bars elsewhere."""
    from internvl_lora.chat import run_chat

    q = "What color is the shape?"
    capfd.readouterr()
    run_chat(str(merged_run.merged), q, [merged_run.images[1]], max_new_tokens=MAX_NEW)
    captured = capfd.readouterr()
    assert captured.out == chat_once(merged_run.merged_model, q, [merged_run.images[1]], max_new_tokens=MAX_NEW) + "\n"


def test_cli_interactive_on_the_adapter_folder(merged_run):
    q1, q2 = "What color is the shape?", "Describe the image."
    proc = _cli(str(merged_run.adapter), "--image", merged_run.images[2], "--max-new-tokens", str(MAX_NEW), stdin=f"{q1}\n{q2}\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.split("\n")
    assert len(lines) == 3 and lines[2] == "", proc.stdout  # exactly two answer lines
    assert lines[0] == chat_once(merged_run.adapter_model, q1, [merged_run.images[2]], max_new_tokens=MAX_NEW)
