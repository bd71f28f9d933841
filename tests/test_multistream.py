"""data_prep.multistream on gensim's real dumps: the output decompresses to the source byte for
byte, every index offset starts a bz2 stream holding exactly the pages listed for it, parts are
complete dumps that together hold every page in order, min_mb copies are distinct documents, and a
bad source is a UserError naming it with nothing written."""
import bz2
import io
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from data_prep.__main__ import main
from data_prep.multistream import dump_name, write_multistream
from pipeline.errors import UserError

PAGE = re.compile(rb"<page>.*?</page>", re.S)
TITLE = re.compile(rb"<title>(.*?)</title>")
PAGE_ID = re.compile(rb"<id>(\d+)</id>")


def gensim_dump(name: str) -> Path:
    import gensim
    return Path(gensim.__file__).parent / "test" / "test_data" / name


def pages(xml: bytes) -> list[tuple[int, bytes]]:
    """(page id, title) of each <page> block, in order."""
    return [(int(PAGE_ID.search(p).group(1)), TITLE.search(p).group(1)) for p in PAGE.findall(xml)]


def streams(path: Path) -> list[tuple[int, bytes]]:
    """(offset, decompressed XML) of each bz2 stream in the file."""
    data, offset, out = path.read_bytes(), 0, []
    while offset < len(data):
        d = bz2.BZ2Decompressor()
        xml = d.decompress(data[offset:])
        assert d.eof, f"stream at {offset} does not end"
        out.append((offset, xml))
        offset = len(data) - len(d.unused_data)
    return out


def index_entries(path: Path) -> list[tuple[int, int, bytes]]:
    lines = bz2.open(path).read().splitlines()
    return [(int(o), int(i), t) for o, i, t in (line.split(b":", 2) for line in lines)]


@pytest.fixture(scope="module")
def enwiki() -> Path:
    return gensim_dump("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")


@pytest.fixture(scope="module")
def multistream(enwiki, tmp_path_factory) -> list[Path]:
    return write_multistream(enwiki, tmp_path_factory.mktemp("ms"), pages_per_stream=7)


def test_names(enwiki, multistream):
    name = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened"
    assert [p.name for p in multistream] == [f"{name}-multistream.xml.bz2",
                                             f"{name}-multistream-index.txt.bz2"]
    assert dump_name(Path("enwiki-20240101-pages-articles-multistream.xml.bz2")) == \
        "enwiki-20240101-pages-articles"
    assert dump_name(Path("dump.xml")) == "dump"


@pytest.mark.parametrize("name", [
    "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    "enwiki-table-markup.xml.bz2",  # no <siteinfo>, no newline after </mediawiki>
    "testcorpus.xml.bz2",  # CRLF line ends, a blank line before </mediawiki>
])
def test_round_trip_is_byte_identical(name, tmp_path):
    src = gensim_dump(name)
    out, index = write_multistream(src, tmp_path, pages_per_stream=3)
    assert bz2.open(out).read() == bz2.open(src).read()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, index.name])  # no temporaries


def test_plain_xml_and_multistream_sources(multistream, tmp_path):
    """A plain .xml and a multistream .bz2 (our own output) are sources too, re-cut unchanged."""
    xml = bz2.open(gensim_dump("testcorpus.xml.bz2")).read()
    plain = tmp_path / "testcorpus.xml"
    plain.write_bytes(xml)
    (out, _), = [write_multistream(plain, tmp_path / "plain")]
    assert bz2.open(out).read() == xml
    out, _ = write_multistream(multistream[0], tmp_path / "again", pages_per_stream=50)
    assert bz2.open(out).read() == bz2.open(multistream[0]).read()
    assert len(streams(out)) == 1 + 5 + 1  # header, 206 pages by 50, footer


def test_lines_between_pages_and_an_empty_dump_are_kept(tmp_path):
    page = b"\t<page>\n\t\t<title>T%d</title>\n\t\t<id>%d</id>\n\t</page>\n"
    head = b'<?xml version="1.0"?>\n<mediawiki xmlns="x">\n'
    xml = head + page % (1, 1) + b"\n  \n" + page % (2, 2) + b"\n" + page % (3, 3) + b"</mediawiki>"
    src = tmp_path / "handmade.xml"
    src.write_bytes(xml)
    out, index = write_multistream(src, tmp_path / "out", pages_per_stream=2)
    assert bz2.open(out).read() == xml
    assert [pages(x) for _, x in streams(out)] == [[], [(1, b"T1"), (2, b"T2")], [(3, b"T3")], []]
    src.write_bytes(head + b"</mediawiki>\n")
    out, index = write_multistream(src, tmp_path / "empty")
    assert [x for _, x in streams(out)] == [head, b"</mediawiki>\n"]
    assert index_entries(index) == []


def test_utf16_dump_is_transcoded(tmp_path):
    src = gensim_dump("bgwiki-latest-pages-articles-shortened.xml.bz2")  # UTF-16 with a BOM
    out, index = write_multistream(src, tmp_path)
    assert bz2.open(out).read() == bz2.open(src).read().decode("utf-16").encode("utf-8")
    assert [t for _, _, t in index_entries(index)][0].decode() == "Григориански календар"


def test_index_offsets_start_streams_of_exactly_their_pages(enwiki, multistream):
    out, index = multistream
    entries = index_entries(index)
    by_stream = {offset: xml for offset, xml in streams(out)}
    assert len(entries) == 206
    listed: dict[int, list[tuple[int, bytes]]] = {}
    for offset, page_id, title in entries:
        listed.setdefault(offset, []).append((page_id, title))
    for offset, expected in listed.items():
        assert offset in by_stream, f"index offset {offset} is not a stream start"
        assert pages(by_stream[offset]) == expected
        assert len(expected) <= 7
    # Every stream that holds pages is indexed; the rest are the header and the footer.
    assert [o for o, xml in by_stream.items() if b"<page>" in xml] == list(listed)
    assert pages(bz2.open(enwiki).read()) == [(i, t) for _, i, t in entries]


def test_first_stream_is_the_header_and_last_the_footer(multistream):
    parts = streams(multistream[0])
    (first_offset, header), (_, footer) = parts[0], parts[-1]
    assert first_offset == 0 and header.lstrip().startswith(b"<mediawiki")
    assert b"</siteinfo>" in header and b"<page>" not in header
    assert footer.strip() == b"</mediawiki>"
    assert len(parts) == 1 + 30 + 1  # 206 pages by 7


def test_parts_are_complete_dumps_of_consecutive_pages(enwiki, tmp_path):
    paths = write_multistream(enwiki, tmp_path, parts=3)
    assert [p.name for p in paths] == [
        f"enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened-part{k}.xml.bz2"
        for k in (1, 2, 3)]
    source = bz2.open(enwiki).read()
    got = []
    for p in paths:
        assert len(streams(p)) == 1  # single-stream, like Wikimedia's non-multistream parts
        xml = bz2.open(p).read()
        ids = [int(el.findtext("{*}id")) for _, el in ET.iterparse(io.BytesIO(xml))
               if el.tag.endswith("}page")]
        assert ids == [i for i, _ in pages(xml)]
        assert xml.startswith(source[:source.index(b"  <page>")])
        assert xml.endswith(b"</page>\n</mediawiki>\n")
        got.append(pages(xml))
    assert [len(g) for g in got] == [68, 69, 69]
    assert sum(got, []) == pages(source)


def test_min_mb_repeats_pages_as_distinct_documents(tmp_path):
    src = gensim_dump("testcorpus.xml.bz2")  # 9 pages, ids 1..9, 8 KB
    out, index = write_multistream(src, tmp_path, min_mb=0.05)
    xml, source = bz2.open(out).read(), bz2.open(src).read()
    assert len(xml) >= 0.05 * (1 << 20)
    assert xml.startswith(source[:source.rindex(b"</page>")])  # the originals first, unchanged
    got = pages(xml)
    assert len(got) > 9 * 5
    assert len({i for i, _ in got}) == len({t for _, t in got}) == len(got)
    assert got[9] == (1 + 1 * 10, b"Article1 (copy 1)") and got[20] == (3 + 2 * 10, b"Article3 (copy 2)")
    assert [(i, t) for _, i, t in index_entries(index)] == got
    copy = PAGE.findall(xml)[9]
    assert b"<id>631144794</id>" in copy  # the revision's id is not the page's: unchanged
    assert xml.endswith(b"</page>\r\n  \r\n</mediawiki>")
    ET.fromstring(xml)


@pytest.mark.parametrize("bad", ["truncated", "not_a_dump", "ends_in_page"])
def test_bad_source_is_a_user_error_naming_it(bad, enwiki, tmp_path):
    src = tmp_path / "bad.xml.bz2"
    if bad == "truncated":
        data = enwiki.read_bytes()
        src.write_bytes(data[:len(data) // 2])
    elif bad == "not_a_dump":
        src.write_bytes(bz2.compress(b"just some text\n" * 100))
    else:
        xml = bz2.open(gensim_dump("testcorpus.xml.bz2")).read()
        src.write_bytes(bz2.compress(xml[:xml.rindex(b"<revision>")]))
    out = tmp_path / "out"
    with pytest.raises(UserError, match=re.escape(str(src))):
        write_multistream(src, out)
    assert not out.exists() or not list(out.iterdir())  # nothing, not even a temporary


def test_cli(capsys, tmp_path):
    src = gensim_dump("testcorpus.xml.bz2")
    assert main(["multistream", str(src), str(tmp_path), "--pages-per-stream", "4", "--no-index"]) == 0
    (out,) = tmp_path.iterdir()
    assert out.name == "testcorpus-multistream.xml.bz2" and str(out) in capsys.readouterr().out
    assert len(streams(out)) == 1 + 3 + 1
    assert main(["multistream", str(tmp_path / "missing.xml"), str(tmp_path)]) == 2
    assert "missing.xml: no such file" in capsys.readouterr().err
