"""The Austen extractor: six novels, each starting with its known first sentence, only text.

Reads the real corpus file (Debian's r-cran-janeaustenr, installed by scripts/setup.sh)."""

import pytest

from owq.builtin import corpus as austen

pytestmark = pytest.mark.corpus

FIRST_SENTENCES = {
    "sense_and_sensibility": "The family of Dashwood had long been settled in Sussex.",
    "pride_and_prejudice": "It is a truth universally acknowledged, that a single man in "
    "possession of a good fortune, must be in want of a wife.",
    "mansfield_park": "About thirty years ago Miss Maria Ward, of Huntingdon, with only seven "
    "thousand pounds, had the good luck to captivate Sir Thomas Bertram",
    "emma": "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy "
    "disposition, seemed to unite some of the best blessings of existence",
    "northanger_abbey": "No one who had ever seen Catherine Morland in her infancy would have "
    "supposed her born to be an heroine.",
    "persuasion": "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his "
    "own amusement, never took up any book but the Baronetage",
}


def flat(text: str) -> str:
    return " ".join(text.split())


def test_six_novels_in_order():
    novels = austen.read_novels()
    assert list(novels) == list(FIRST_SENTENCES)


@pytest.mark.parametrize("name", list(FIRST_SENTENCES))
def test_first_sentence_opens_first_chapter(name):
    text = flat(austen.read_novels()[name])
    chapter = text.upper().find("CHAPTER")
    first = text.find(FIRST_SENTENCES[name])
    assert 0 < chapter < first < chapter + 40, (chapter, first)
    assert len(text) > 300_000


def test_nothing_but_text():
    for name, text in austen.read_novels().items():
        assert text.isprintable() or all(c.isprintable() or c == "\n" for c in text), name
        assert "\x00" not in text and "CHARSXP" not in text


def test_calibration_excludes_heldout():
    calib = austen.calibration_text()
    assert FIRST_SENTENCES["persuasion"] not in flat(calib)
    assert FIRST_SENTENCES["emma"] in flat(calib)
    assert FIRST_SENTENCES["persuasion"] in flat(austen.heldout_text())


def test_missing_corpus_says_what_to_install(tmp_path):
    with pytest.raises(austen.CorpusMissing, match="apt-get install r-cran-janeaustenr"):
        austen.read_novels(tmp_path / "Rdata.rdb")


def test_env_var_names_a_copy_of_the_file(tmp_path, monkeypatch):
    copy = tmp_path / "austen.rdb"
    copy.write_bytes(austen.rdata_path().read_bytes())
    monkeypatch.setenv(austen.RDATA_ENV, str(copy))
    assert austen.rdata_path() == copy
    assert list(austen.read_novels()) == list(FIRST_SENTENCES)
    monkeypatch.setenv(austen.RDATA_ENV, str(tmp_path / "gone.rdb"))
    with pytest.raises(austen.CorpusMissing, match="gone.rdb missing.*OWQ_AUSTEN_RDATA"):
        austen.read_novels()


def test_the_copy_in_this_environment_comes_before_the_system_path(tmp_path, monkeypatch):
    """scripts/setup.sh takes the file out of Debian's package into the venv (no R needed)."""
    copy = tmp_path / "share" / "Rdata.rdb"
    copy.parent.mkdir()
    copy.write_bytes(austen.rdata_path().read_bytes())
    monkeypatch.delenv(austen.RDATA_ENV, raising=False)
    monkeypatch.setattr(austen, "ENV_RDATA", copy)
    assert austen.rdata_path() == copy
    monkeypatch.setattr(austen, "ENV_RDATA", tmp_path / "absent.rdb")
    assert austen.rdata_path() == austen.RDATA
