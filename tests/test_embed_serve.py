"""/v1/embeddings with the official `openai` client against `embed` run directly on the same engine."""

from __future__ import annotations

import numpy as np
import openai
import pytest

from test_embed import DOCS, INSTRUCTION, QUERIES
from test_serve import KEY, running
from kanana_quant.embed import embed
from kanana_quant.loader import open_model
from kanana_quant.runtimes.numpy_engine import NumpyEngine
from kanana_quant.serve import Settings
from kanana_quant.serve.embeddings import EmbeddingService
from kanana_quant.synth import TINY, synth_model

NAME = "tiny-embedding"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    raw = {**TINY["embedding"], "architectures": ["LlamaModel"], "pooling": "mean", "is_causal": False,
           "matryoshka_dimensions": [32, 64]}
    return open_model(str(synth_model(tmp_path_factory.mktemp("serve-emb") / NAME, raw, seed=9)))


@pytest.fixture(scope="module")
def client(model):
    with running(EmbeddingService(model, Settings(api_key=KEY, name=NAME))) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)


def direct(model, texts, **kw):
    return embed(NumpyEngine(model.weights), model.tokenizer, model.config, texts, normalize=True, **kw)


def test_embeddings_equal_embed(client, model):
    texts = DOCS + QUERIES
    reply = client.embeddings.create(model=NAME, input=texts)  # the client asks for base64 and decodes it
    got = np.array([d.embedding for d in reply.data])
    assert [d.index for d in reply.data] == list(range(len(texts)))
    np.testing.assert_allclose(got, direct(model, texts), atol=1e-6)
    assert reply.usage.prompt_tokens == sum(len(model.tokenizer.encode(t, add_special_tokens=True)) for t in texts)
    floats = client.embeddings.create(model=NAME, input=DOCS[0], encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, got[0], atol=1e-6)


def test_instruction_and_dimensions(client, model):
    reply = client.embeddings.create(model=NAME, input=QUERIES, dimensions=32, extra_body={"instruction": INSTRUCTION})
    got = np.array([d.embedding for d in reply.data])
    assert got.shape == (2, 32)
    np.testing.assert_allclose(got, direct(model, QUERIES, instruction=INSTRUCTION, dim=32), atol=1e-6)


@pytest.mark.parametrize("kw, status, fragment", [
    ({"model": "other", "input": "x"}, 404, "does not exist"),
    ({"model": NAME, "input": [[1, 2, 3]]}, 400, "token-array inputs are not supported"),
    ({"model": NAME, "input": "x", "dimensions": 48}, 400, "--dim 48"),
    ({"model": NAME, "input": ["ok", " "]}, 400, "an input is empty"),
    ({"model": NAME, "input": "x", "extra_body": {"temperature": 1}}, 400, "temperature"),
])
def test_bad_requests_are_openai_errors(client, kw, status, fragment):
    with pytest.raises(openai.APIStatusError) as e:
        client.embeddings.create(**kw)
    assert e.value.status_code == status and fragment in e.value.message


def test_generation_routes_say_why_not(client):
    with pytest.raises(openai.BadRequestError, match="is an embedding model"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=str(client.base_url), api_key="wrong", max_retries=0).embeddings.create(
            model=NAME, input="x")
