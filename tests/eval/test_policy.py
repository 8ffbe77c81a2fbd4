"""The model side of evaluation on a tiny random model and a real SentencePiece tokenizer: batched log-likelihoods
equal an unbatched forward pass, MC scoring picks the max-likelihood choice, KL of a policy with itself is 0,
batched generation equals one-row generation, and the LLM / reward-model judges are antisymmetric."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign.data import chat, synthetic
from jaxalign.data.tokenizer import train_sentencepiece
from jaxalign.eval import evaluate, judges, mc
from jaxalign.eval import policy as policy_lib
from jaxalign.models.heads import RewardScorer, ScalarModel
from tests.helpers import random_model, tiny

VOCAB = 384


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [r["text"] for r in synthetic.pretraining_corpus(60, seed=0)]
    return train_sentencepiece(texts, str(tmp_path_factory.mktemp("tok") / "sp.model"), VOCAB)


def make_model(seed: int):
    return nnx.merge(*random_model(seed=seed, vocab_size=VOCAB, max_seq_len=256, n_heads=4, n_kv_heads=2))


@pytest.fixture(scope="module")
def policy(tok):
    return policy_lib.Policy(make_model(0), tok, "chatml", batch_size=4)


ORACLE_LEN = 64


@jax.jit
def _oracle_forward(model, ids_1xT):
    T = ids_1xT.shape[1]
    h = model.hidden(ids_1xT, jnp.arange(T)[None], jnp.ones((1, T), jnp.int32))
    return jax.nn.log_softmax(model.logits(h.reshape(T, -1)).astype(jnp.float32), axis=-1)


def oracle_logps(model, context, continuation):
    """Log-probs of the continuation from one forward pass of the whole sequence, unpadded on the left (zeros on
    the right, which a causal model's earlier positions never see, so every call shares one program)."""
    seq = list(context) + list(continuation)
    assert len(seq) <= ORACLE_LEN
    logp = np.asarray(_oracle_forward(model, jnp.asarray([seq + [0] * (ORACLE_LEN - len(seq))], jnp.int32)))
    start = len(context) - 1
    return logp[start + np.arange(len(continuation)), np.asarray(continuation, int)]


def test_batched_continuation_logps_equal_an_unpadded_forward(policy):
    rng = np.random.default_rng(0)
    pairs = [
        (list(rng.integers(4, VOCAB, size=n)), list(rng.integers(4, VOCAB, size=m)))
        for n, m in [(1, 3), (7, 1), (20, 18), (3, 5), (11, 2)]
    ]  # 5 pairs in batches of 4: widths padded, the last batch filled with copies
    got = policy_lib.continuation_logps(policy.model, pairs, batch_size=4)
    for (context, continuation), logps in zip(pairs, got, strict=True):
        np.testing.assert_allclose(
            logps, oracle_logps(policy.model, context, continuation), atol=2e-5, rtol=0
        )


def test_mc_scoring_picks_the_max_likelihood_choice(policy, tok):
    questions = ["Where was Ada Abbott born?", "What is 3 + 4?", "Who is a baker?"]
    choices = [["Lisbon", "Oslo", "in the city of Quito"], ["7", "8", "12"], ["Ines Novak", "Omar", "nobody"]]
    sums = []
    for q, cs in zip(questions, choices, strict=True):
        record = {"question": q, "choices": cs, "answer": 0}
        sums.append([oracle_logps(policy.model, c, x).sum() for c, x in mc.choice_pairs(tok, record)])
    best = [int(np.argmax(s)) for s in sums]
    best_norm = [
        int(np.argmax(np.asarray(s) / [len(c.encode()) for c in cs]))
        for s, cs in zip(sums, choices, strict=True)
    ]
    records = [
        {"question": q, "choices": cs, "answer": b} for q, cs, b in zip(questions, choices, best, strict=True)
    ]
    assert mc.evaluate(policy.model, tok, records, batch_size=4)["mc_acc"] == 1.0
    worst = [{**r, "answer": int(np.argmin(s))} for r, s in zip(records, sums, strict=True)]
    assert mc.evaluate(policy.model, tok, worst, batch_size=4)["mc_acc"] == 0.0
    norm = [{**r, "answer": b} for r, b in zip(records, best_norm, strict=True)]
    assert mc.evaluate(policy.model, tok, norm, batch_size=4)["mc_acc_norm"] == 1.0


def test_perplexity_is_the_exp_of_the_token_weighted_nll(policy, tok):
    texts = ["Ada Abbott was born in Lisbon in 1953.", "12 + 5 = 17", "The poet Ines Novak comes from Oslo."]
    nll = [-oracle_logps(policy.model, [tok.bos_id], tok.encode(t)) for t in texts]
    expected = np.exp(np.concatenate(nll).mean())
    got = policy_lib.perplexity(policy.model, tok, texts, batch_size=4)
    assert got["tokens"] == sum(len(x) for x in nll)
    assert got["perplexity"] == pytest.approx(expected, rel=1e-4)


PROMPTS = [
    [{"role": "user", "content": q}] for q in ("Where was Ada born?", "What is 3 + 4?", "Hello", "Hi there")
]


def test_kl_of_a_policy_with_itself_is_zero_and_positive_to_another(policy):
    for estimator in ("k1", "k3"):
        same = policy_lib.kl_to_ref(policy, policy.model, PROMPTS, estimator=estimator, max_new_tokens=6)
        assert same == {"kl_to_ref": 0.0, "kl_estimator": estimator}
    other = policy_lib.kl_to_ref(policy, make_model(1), PROMPTS, estimator="k3", max_new_tokens=6)
    assert other["kl_to_ref"] > 0.1


def test_batched_generation_equals_one_row_at_a_time(policy, tok):
    batched = policy_lib.generate(policy, PROMPTS, max_new_tokens=8)
    single = policy_lib.Policy(policy.model, tok, "chatml", batch_size=1)
    one_by_one = policy_lib.generate(single, PROMPTS, max_new_tokens=8)
    assert batched.texts == one_by_one.texts
    np.testing.assert_array_equal(batched.tokens_NxC, one_by_one.tokens_NxC)
    # Texts are decoded up to (without) the first stop id.
    stops = policy.stop_ids
    for text, row in zip(batched.texts, batched.tokens_NxC, strict=True):
        ids = [int(t) for t in row]
        cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
        assert text == tok.decode(ids[:cut])


def test_llm_judge_swap_cancels_its_position_bias(policy):
    items = [("Where was Ada born?", "In Lisbon.", "In Oslo."), ("What is 3 + 4?", "7", "3 + 4 = 8.")]
    raw = judges.LLMJudge(policy, swap=False)
    swapped = judges.LLMJudge(policy)
    for q, a, b in items:
        forward, backward = raw(q, a, b), raw(q, b, a)
        # A random model prefers a position more than the answers: unswapped, it is not antisymmetric.
        assert abs(forward + backward - 1.0) > 1e-3
        assert swapped(q, a, b) + swapped(q, b, a) == pytest.approx(1.0, abs=1e-12)
        assert swapped(q, a, b) == pytest.approx(0.5 * (forward + 1.0 - backward), abs=1e-12)
        assert swapped(q, a, a) == pytest.approx(0.5, abs=1e-12)
    qs, As, Bs = zip(*items, strict=True)
    np.testing.assert_allclose(swapped.batch(qs, As, Bs), [swapped(*x) for x in items], atol=1e-6)


def test_reward_judge_and_pair_accuracy(policy, tok, tmp_path):
    cfg = tiny(vocab_size=VOCAB, d_model=32, head_dim=8, max_seq_len=256, n_heads=4, n_kv_heads=2)
    scorer = RewardScorer(*nnx.split(ScalarModel(cfg, nnx.Rngs(0))), tok, batch_size=4)
    tasks = evaluate.world_tasks(synthetic.write_world(str(tmp_path), 60, seed=3), max_examples=12)
    rm = judges.RewardModelJudge(scorer, tok)
    prompts = [evaluate._user_text(r["prompt"]) for r in tasks.preference]
    chosen = [r["chosen"][-1]["content"] for r in tasks.preference]
    rejected = [r["rejected"][-1]["content"] for r in tasks.preference]
    p = rm.batch(prompts, chosen, rejected)
    r_c, r_r = rm.scores(prompts, chosen), rm.scores(prompts, rejected)
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-(r_c.astype(np.float64) - r_r))), rtol=1e-6)
    assert rm(prompts[0], chosen[0], rejected[0]) == pytest.approx(p[0], rel=1e-5)
    # Scored as the conversation the RM was trained on: the same ids the preference rows hold.
    acc = judges.reward_pair_accuracy(scorer, tasks.preference, tok, "chatml")
    assert acc == np.mean(r_c > r_r)
    flipped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in tasks.preference]
    assert judges.reward_pair_accuracy(scorer, flipped, tok, "chatml") == pytest.approx(1.0 - acc, abs=1e-12)
    assert 0.0 < acc < 1.0  # a random scorer: both outcomes occur, so the flip is a real check


def answering_model(tok, answer: str, seed: int = 0):
    """A model whose greedy reply to any chat prompt is `answer` then the end of turn: every block's output
    projections are zero (the last hidden state is the normalised embedding of the current token), and the
    vocabulary projection maps the assistant header's last token to the answer's first token, each answer token to
    the next, and the last to <|im_end|> (a column y holds the normalised embedding of y's predecessor, so its
    logit d * 50 beats every other column's, random vectors' dot products)."""
    graphdef, params = random_model(seed=seed, vocab_size=VOCAB, max_seq_len=256, n_heads=4, n_kv_heads=2)
    model = nnx.merge(graphdef, params)
    for block in model.blocks:
        block.attn.wo[...] = jnp.zeros_like(block.attn.wo[...])
        block.mlp.w_down[...] = jnp.zeros_like(block.mlp.w_down[...])
    embed = np.asarray(model.embed[...], np.float64)
    scale = np.asarray(model.final_norm.scale[...], np.float64)
    norm = lambda x: embed[x] / np.sqrt(np.mean(embed[x] ** 2) + model.cfg.norm_eps) * scale
    header_end = chat.render(tok, [{"role": "user", "content": "x"}], "chatml", add_generation_prompt=True)[
        0
    ][-1]
    chain = [header_end, *tok.encode(answer), tok.token_id("<|im_end|>")]
    assert len(set(chain)) == len(chain), chain
    head = np.zeros((model.cfg.d_model, VOCAB))
    for x, y in zip(chain[:-1], chain[1:], strict=True):
        head[:, y] = 50 * norm(x)
    model.lm_head[...] = jnp.asarray(head, jnp.float32)
    return model, len(chain) - 1


def test_a_model_that_always_answers_right_scores_one(tok):
    right, n_right = answering_model(tok, "Lisbon")
    wrong, _ = answering_model(tok, "Oslo", seed=1)
    arith, _ = answering_model(tok, "17", seed=2)
    ask = lambda q: [{"role": "user", "content": q}]
    names = ["Ada Abbott", "Ines Novak", "Omar Petrov", "Kai Tanaka", "Vera Xu"]
    tasks = evaluate.WorldTasks(
        qa=[
            (ask(f"In which city was {n} born? Answer with the name of the city only."), "Lisbon")
            for n in names
        ],
        arith=[(ask(q), "17") for q in ("What is 12 + 5?", "What is 20 - 3?", "What is 1 + 16?")],
        chat=[(ask(f"Where was {n} born?"), "Lisbon") for n in names],
        texts=[],
        preference=[],
    )
    policy = policy_lib.Policy(right, tok, "chatml", batch_size=4)
    out = evaluate.evaluate_policy(
        policy, tasks, max_new_tokens=8, baseline=policy_lib.Policy(wrong, tok, batch_size=4), reference=right
    )
    assert out["qa_exact_match"] == 1.0
    assert out["arith_accuracy"] == 0.0  # "Lisbon" holds no number
    assert out["win_rate_vs_sft"] == 1.0  # right beats the baseline's "Oslo" on every prompt
    assert out["mean_length"] == n_right  # the answer's tokens and the end of turn
    assert out["kl_to_ref"] == 0.0 and out["kl_estimator"] == "k3"
    out = evaluate.evaluate_policy(
        policy_lib.Policy(wrong, tok, batch_size=4), tasks, max_new_tokens=8, baseline=policy
    )
    assert out["qa_exact_match"] == 0.0 and out["win_rate_vs_sft"] == 0.0
    out = evaluate.evaluate_policy(policy_lib.Policy(arith, tok, batch_size=4), tasks, max_new_tokens=8)
    assert out["arith_accuracy"] == 1.0 and out["qa_exact_match"] == 0.0


def test_an_llm_judge_that_always_says_a_gets_one_half_after_the_swap(tok):
    says_a, _ = answering_model(tok, "A")
    judge_policy = policy_lib.Policy(says_a, tok, "chatml", batch_size=4)
    raw, swapped = judges.LLMJudge(judge_policy, swap=False), judges.LLMJudge(judge_policy)
    qs = ["Where was Ada born?", "What is 3 + 4?"]
    good, bad = ["Ada was born in Lisbon.", "7"], ["Ada was born in Oslo.", "3 + 4 = 8."]
    np.testing.assert_allclose(raw.batch(qs, good, bad), 1.0, atol=1e-6)  # it prefers the first position...
    np.testing.assert_allclose(raw.batch(qs, bad, good), 1.0, atol=1e-6)  # ...whatever is there
    np.testing.assert_allclose(swapped.batch(qs, good, bad), 0.5, atol=1e-6)
    assert judges.win_rate(qs, good, bad, swapped) == pytest.approx(0.5, abs=1e-6)


def test_qa_clean_score_is_the_exact_match_over_the_uncontaminated_questions(tok):
    right, _ = answering_model(tok, "Lisbon")  # answers "Lisbon" to everything
    golds = ["Lisbon", "Oslo", "Lisbon", "Lima", "Lisbon"]
    tasks = evaluate.WorldTasks(
        qa=[([{"role": "user", "content": f"Where was person {k} born?"}], g) for k, g in enumerate(golds)],
        arith=[],
        chat=[],
        texts=[],
        preference=[],
        qa_ids=[f"q{k}" for k in range(len(golds))],
    )
    policy = policy_lib.Policy(right, tok, "chatml", batch_size=4)
    out = evaluate.evaluate_policy(policy, tasks, max_new_tokens=8, contaminated={"q0", "q2"})
    assert out["qa_exact_match"] == pytest.approx(3 / 5)
    # The clean items q1 (Oslo), q3 (Lima), q4 (Lisbon): one right.
    assert out["qa_exact_match_clean"] == pytest.approx(1 / 3) and out["qa_count_clean"] == 3
    assert "qa_exact_match_clean" not in evaluate.evaluate_policy(policy, tasks, max_new_tokens=8)
