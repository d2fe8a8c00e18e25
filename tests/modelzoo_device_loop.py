"""Run by tests/test_modelzoo_generation.py with the modelzoo on PYTHONPATH: the generation loop
on the device, as SambaNova's runtime drives a multigraph PEF, without the host in between.

cache_gen -> token_gen_init -> postprocess_greedy -> (token_gen -> postprocess_greedy) * (N - 1):
the postprocess graph writes each sampled token into token_gen's input_ids region, advances
last_token_index and the attention mask in place and stores the token in generated_tokens. The
script prints the decoded generated_tokens, one repr per line.

    python modelzoo_device_loop.py CHECKPOINT PEF N PROMPT...
"""

import sys

import torch
from sambanova_modelzoo.libs.common.pretrained_model_schema import PretrainedModelConfig
from sambanova_modelzoo.libs.nlp.core.generation.cached_inference_compiler import CachedInferenceCompiler
from sambanova_modelzoo.libs.nlp.core.generation.configuration_utils import (
    configure_pad_token,
    get_config_overrides_for_generation,
)
from sambanova_modelzoo.libs.nlp.core.generation.sampling import SamplingMethod
from sambanova_modelzoo.models.utils import load_model_from_pretrained
from transformers import AutoTokenizer

import sambaflow.samba as samba

checkpoint, pef, new_tokens, prompts = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
tokenizer = AutoTokenizer.from_pretrained(checkpoint, padding_side="right")
configure_pad_token(tokenizer)
config = PretrainedModelConfig(
    max_seq_length=64, mixedp_attn=False, fp32_ln=True, fp32_logits=True, fp32_skip_add=True
)
overrides = get_config_overrides_for_generation(pad_token_id=tokenizer.pad_token_id)
model = load_model_from_pretrained(checkpoint, config, overrides).eval()
compiler = CachedInferenceCompiler(model, len(prompts), {16, 64})
compiler.trace()
samba.session.init_multigraph_runtime(pef)

names, graphs = compiler.input_names, compiler.graph_names
batch = tokenizer(prompts, padding=True, return_tensors="pt")
ids, mask = batch["input_ids"].int(), batch["attention_mask"].int()
length = 16 if ids.shape[1] <= 16 else 64
last = (mask.cumsum(1).argmax(1, keepdim=True)).int()
run = samba.session.run
run({names.cache_gen_input_ids(length): torch.nn.functional.pad(ids, (0, length - ids.shape[1])),
     names.last_token_index: last}, graph_name=graphs.cache_gen(length))  # fmt: skip
run({names.attention_mask: torch.nn.functional.pad(mask, (0, 64 - mask.shape[1])),
     names.generated_index: torch.full((len(prompts), 1), 7, dtype=torch.int32)},  # reset to 0 by the graph
    graph_name=graphs.token_gen_init())  # fmt: skip
start = {
    names.generated_tokens: torch.zeros(len(prompts), 64, dtype=torch.int32),
    names.generated_tokens_streaming: torch.zeros(len(prompts), 20, dtype=torch.int32),
    names.repetition_penalty: torch.ones(len(prompts), 1),
}
run(start, graph_name=graphs.postprocess(SamplingMethod.greedy))
for _ in range(new_tokens - 1):
    run({}, graph_name=graphs.token_gen(64))
    run({}, graph_name=graphs.postprocess(SamplingMethod.greedy))
tokens = samba.session.get_tensors_by_name([names.generated_tokens])[0][:, :new_tokens]
for row in tokens.tolist():
    if tokenizer.eos_token_id in row:  # HF generate pads a finished row with EOS, decoded away
        row = row[: row.index(tokenizer.eos_token_id)]
    print(repr(tokenizer.decode(row, skip_special_tokens=True)))
