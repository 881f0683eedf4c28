"""Every notebook of the learning path (nb/*.ipynb, picked up by glob) runs top to bottom on a CPU.

Each notebook is executed in a fresh kernel with nbclient, with nb/ as its working directory and
GPT_NB_TEXT naming a small play that this file writes (about 60 KB of Shakespeare-like English), so
nothing is downloaded and each notebook takes seconds. The kernel sees no GPU and, unless
OMP_NUM_THREADS says otherwise, uses one thread: a notebook's small matmuls gain little from more,
and on a busy machine extra threads make it many times slower. A failing cell fails the test, which
names the notebook and the cell.
"""

import glob
import json
import os
import random
import re

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NB_DIR = os.path.join(ROOT, "nb")
NOTEBOOKS = sorted(glob.glob(os.path.join(NB_DIR, "*.ipynb")))
CELL_TIMEOUT = 600  # seconds; a guard against a hang (a cell takes seconds on the test text)

SPEAKERS = ["ROMEO", "JULIET", "NURSE", "MERCUTIO", "FRIAR LAURENCE", "KING HENRY", "QUEEN MARGARET",
            "GLOUCESTER", "LADY CAPULET", "FIRST CITIZEN", "BENVOLIO", "DUKE VINCENTIO"]
NOUNS = ["heart", "night", "crown", "sword", "love", "grief", "blood", "king", "moon", "soul", "death",
         "honour", "father", "lady", "house", "tongue", "eyes", "heaven", "time", "world", "friend",
         "hand", "name", "fortune", "grave", "morning", "queen", "city", "word", "sorrow"]
ADJS = ["gentle", "sweet", "noble", "cruel", "fair", "dead", "proud", "poor", "royal", "bloody",
        "true", "false", "young", "old", "wretched", "holy", "dear", "heavy", "bright", "dark"]
VERBS = ["love", "fear", "seek", "bear", "keep", "lose", "swear", "kill", "pardon", "hear", "know",
         "speak", "follow", "curse", "trust", "weep for", "remember", "forgive", "serve", "leave"]
ADVS = ["softly", "truly", "never", "still", "gladly", "well", "ill", "boldly", "here", "now"]
LINES = [
    "I {v} the {a} {n} of {P}.",
    "O {a} {n}, why dost thou {v} me so?",
    "What {n} is this that makes thee {a}?",
    "My lord, the {n} is {a}, and {ad} I {v} it.",
    "Thou art a {a} {n}; I {v} thee not.",
    "Good {P}, {v} my {n}, for it is {a}.",
    "Let us {ad} {v} the {n}, and then to bed.",
    "Come, come, the {n} grows {a}; we must away.",
    "Is it not {a}, this {n} that we {v}?",
    "Shall I {v} thy {n}? Then {v} mine as well.",
    "The {a} {n} doth {v} the {n2}, and so must I.",
    "Ay, {P}; by my {n}, I will {v} you {ad}.",
    "No more of {n}! Hence, thou {a} {n2}!",
    "Why, then the {n} is {a}, and the {n2} {a2}.",
]


def play_text(n_chars=60_000, seed=0):
    """A deterministic, Shakespeare-like play of about n_chars characters: speeches of one to four
    lines, each speech headed by its speaker's name, as in tiny shakespeare."""
    rng = random.Random(seed)
    speeches, size = [], 0
    while size < n_chars:
        who = rng.choice(SPEAKERS)
        lines = []
        for _ in range(rng.randint(1, 4)):
            line = rng.choice(LINES).format(
                n=rng.choice(NOUNS), n2=rng.choice(NOUNS), a=rng.choice(ADJS), a2=rng.choice(ADJS),
                v=rng.choice(VERBS), ad=rng.choice(ADVS), P=rng.choice(SPEAKERS).title())
            lines.append(line[0].upper() + line[1:])
        speech = f"{who}:\n" + "\n".join(lines) + "\n\n"
        speeches.append(speech)
        size += len(speech)
    return "".join(speeches)


@pytest.fixture(scope="module")
def nb_text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("nb_text") / "play.txt"
    path.write_text(play_text(), encoding="utf-8")
    return str(path)


def test_notebooks_found():
    assert NOTEBOOKS, f"no notebooks under {NB_DIR}"


MAX_OUTPUT_CHARS = 100_000  # committed notebooks keep outputs cleared (or small), so diffs stay readable


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_outputs_small(path):
    nb = nbformat.read(path, as_version=4)
    size = sum(len(json.dumps(cell.get("outputs", []))) for cell in nb.cells)
    assert size <= MAX_OUTPUT_CHARS, (f"{os.path.basename(path)} carries {size:,} characters of outputs; "
                                      f"clear them before committing (jupyter nbconvert --clear-output --inplace)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, nb_text_file):
    nb = nbformat.read(path, as_version=4)
    env = dict(os.environ, GPT_NB_TEXT=nb_text_file, CUDA_VISIBLE_DEVICES="")
    env.setdefault("OMP_NUM_THREADS", "1")
    running = {}  # the index of the cell being executed, set by nbclient's hook before each cell
    client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": NB_DIR}},
                            on_cell_execute=lambda cell, cell_index: running.update(index=cell_index))
    try:
        client.execute(env=env)
        return
    except (CellExecutionError, CellTimeoutError) as e:
        error = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # the traceback without its terminal colours
    pytest.fail(f"{os.path.basename(path)}: cell {running['index']} (counting from 0, markdown cells "
                f"included) failed:\n{error}", pytrace=False)
