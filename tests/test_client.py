"""Readable certificates, over real gRPC to a tiny model at K4/V2 (so that some heads escalate):
the certificate carries what its mode means and nothing else, its meaningful zeros print in JSON, logprobs name their
tokens, and the CLI's human output ends with one line that sums up the certificate, the bound over its limit first."""

import asyncio
import json
import re
from pathlib import Path

import pytest
from google.protobuf.json_format import MessageToJson
from transformers import AutoTokenizer

from server import client as cli
from server.pb.certkv.v1 import inference_pb2 as pb
from tests.serving import channel_to, collect, greedy, running_server

PROMPT = list(range(400, 440))


@pytest.fixture(scope="module")
async def server(tiny_llama):
    async with running_server(tiny_llama, kv_mode="certified", k_bits=4, v_bits=2, tolerance=0.1,
                              scratch_blocks=8) as srv:
        yield srv


async def certificate(server, mode: int, tolerance: float | None = None, max_new: int = 12) -> pb.Certificate:
    request = greedy(PROMPT, max_new)
    request.kv.mode = mode
    if tolerance is not None:
        request.kv.tolerance = tolerance
    async with channel_to(server) as (stub, _):
        return (await collect(stub, request))[-1].certificate


@pytest.mark.parametrize("mode", [pb.DENSE, pb.QUANTIZED])
async def test_dense_and_quantized_certify_nothing(server, mode):
    cert = await certificate(server, mode)
    assert [field.name for field, _ in cert.ListFields()] == ["mode"] and not cert.HasField("tolerance")
    assert json.loads(MessageToJson(cert)) == {"mode": pb.KVMode.Name(mode)}


async def test_audit_prints_its_zero_violations(server):
    cert = await certificate(server, pb.AUDIT, 0.02, max_new=30)  # small enough to escalate at K4/V2
    data = json.loads(MessageToJson(cert))  # proto3 JSON, default options: fields without presence drop zeros
    assert data["auditViolations"] == "0" and data["promiseViolations"] == "0"
    assert data["tolerance"] == pytest.approx(0.02) and 0 < data["maxBoundOverTolerance"] <= 1
    rungs = [cert.certified_rung0, cert.rung1_values, cert.rung2_keys, cert.rung3_exact_head, cert.rung4_exact_layer]
    assert cert.escalations == sum(rungs[1:]) > 0
    assert cert.certified_share == pytest.approx(rungs[0] / cert.attention_evaluations)


async def test_certified_and_exact_carry_what_they_mean(server):
    certified = json.loads(MessageToJson(await certificate(server, pb.CERTIFIED)))
    assert certified["tolerance"] == pytest.approx(0.1) and "certifiedShare" in certified
    assert "auditViolations" not in certified  # not audited: no count, rather than a zero that claims a check
    assert "escalations" in certified  # printed when 0 too
    exact = json.loads(MessageToJson(await certificate(server, pb.EXACT)))
    assert exact["tolerance"] == 0 and exact["certifiedShare"] == 0  # tolerance 0 prints: it is the promise
    assert exact["escalations"] == exact["rung3ExactHead"] == exact["attentionEvaluations"]
    assert "maxBoundOverTolerance" not in exact  # nothing was accepted on a bound


async def cli_run(capsys, server, *args: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(cli.main, ["--target", f"127.0.0.1:{server.port}", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


async def test_cli_ends_with_the_certificate_line(server, capsys):
    code, out, err = await cli_run(capsys, server, "Once upon a time", "--max-new-tokens", "8", "--kv-mode", "audit",
                                   "--tolerance", "0.02")
    assert code == 0 and out.strip()
    usage, line = err.strip().splitlines()[-2:]
    assert usage.startswith("[LENGTH; ") and "8 completion tokens" in usage
    pattern = (r"\[certificate, audit at tolerance 0\.02: bound/limit at most [0-9.e-]+; [0-9.]+% certified at rung 0; "
               r"\d+ escalations( \(.*\))?; audit: 0 violations of the bound, 0 of the tolerance\]")
    assert re.fullmatch(pattern, line), line
    for mode, expected in (("dense", "[certificate: none needed, dense attention at full precision]"),
                           ("quantized", "[certificate: none, quantized attention is not checked]")):
        code, _, err = await cli_run(capsys, server, "Hi", "--max-new-tokens", "2", "--kv-mode", mode)
        assert code == 0 and err.strip().splitlines()[-1] == expected
    code, _, err = await cli_run(capsys, server, "Hi", "--max-new-tokens", "4", "--kv-mode", "certified")
    assert err.strip().splitlines()[-1].endswith("; not audited]")
    code, _, err = await cli_run(capsys, server, "Hi", "--max-new-tokens", "3", "--kv-mode", "exact")
    assert re.fullmatch(r"\[certificate, exact: all \d+ attention outputs computed from the full-precision shadows\]",
                        err.strip().splitlines()[-1])


async def test_cli_says_how_much_of_the_prompt_came_from_the_prefix_cache(server, capsys):
    ids = ",".join(str(t) for t in range(500, 540))  # 40 tokens: two full blocks of 16 can be cached
    usages = []
    for _ in range(2):
        code, _, err = await cli_run(capsys, server, ids, "--token-ids", "--max-new-tokens", "2")
        assert code == 0
        usages.append(err.strip().splitlines()[-2])
    assert usages[0].startswith("[LENGTH; 40 prompt + 2 completion tokens"), usages[0]
    assert usages[1].startswith("[LENGTH; 40 prompt (32 from the prefix cache) + 2 completion tokens"), usages[1]


async def test_cli_info_prints_every_field(server, capsys):
    code, out, _ = await cli_run(capsys, server, "--info")
    info = json.loads(out)
    assert code == 0 and set(info) == {field.json_name for field in pb.ModelInfo.DESCRIPTOR.fields}


async def test_logprobs_name_their_tokens(server, capsys, tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    code, out, _ = await cli_run(capsys, server, "Hello", "--max-new-tokens", "3", "--logprobs", "2", "--json")
    entries = [lp for line in out.strip().splitlines() for lp in json.loads(line).get("logprobs", [])]
    assert code == 0 and len(entries) == 3
    for lp in entries:
        assert lp["tokenText"] == tokenizer.decode([lp["tokenId"]]) and len(lp["top"]) == 2
        assert all(t["tokenText"] == tokenizer.decode([t["tokenId"]]) for t in lp["top"])
    code, out, _ = await cli_run(capsys, server, "Hello", "--max-new-tokens", "3", "--logprobs", "2")
    lines = out.splitlines()
    start = lines.index("logprobs (token, then the most likely):")
    assert code == 0 and len(lines[start + 1:]) == 3
    for lp, line in zip(entries, lines[start + 1:]):  # greedy: the same tokens as the JSON run
        assert json.dumps(lp["tokenText"], ensure_ascii=False) in line and "top: " in line


async def test_json_puts_the_certificates_summary_first(server, capsys):
    code, out, _ = await cli_run(capsys, server, "Hello", "--max-new-tokens", "3", "--kv-mode", "audit", "--json")
    cert = json.loads(out.strip().splitlines()[-1])["certificate"]
    assert code == 0 and list(cert)[:6] == ["mode", "maxBoundOverTolerance", "certifiedShare", "escalations",
                                           "auditViolations", "promiseViolations"]


async def test_the_readmes_python_example_runs_as_written(server, capsys):
    """The README's Python snippet, exactly as printed there, against a real server (only its address changes)."""
    readme = Path(__file__).resolve().parent.parent / "README.md"
    snippet = re.search(r"```python\n(.*?)```", readme.read_text(), re.S).group(1)
    assert "127.0.0.1:50051" in snippet
    code = snippet.replace("127.0.0.1:50051", f"127.0.0.1:{server.port}")
    await asyncio.to_thread(exec, compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert re.search(r"certified share [01]\.\d{3}, bound/limit at most \d+\.\d{2}$", printed.strip()), printed
