"""Data Whisperer (Wang et al., ACL 2025): score examples by how much they help in-context.

An episode shows the selector model n_d pool examples as demonstrations and asks it n_q
queries; the episode's score s is the mean task metric over the queries. Demonstration i gets
s * w_i, where w_i comes from the attention that the query rows pay to demonstration i at one
layer l; an example's score is the mean over its appearances.

Variants (conf/method/data_whisperer.yaml):
- `query_layout=joint` (the paper's and the released code's prompt: one completion answers
  all numbered queries) or `separate` (each query its own row over the shared demonstrations);
- `query_scoring=generate` (the paper: greedy answers scored with the task metric; a joint
  completion is read after its pre-filled "Answer 1:") or `likelihood` (an extension,
  registered as `data_whisperer_likelihood`: no generation; each query's score is the mean
  per-token probability of its gold answer, or with `likelihood_span=final` of its final
  `#### n` number, teacher-forced in a row of its own right after the generating prompt, so
  the weights are the generating variant's and no query sees another's gold answer).

What differs from the authors' released code, on purpose:
- Scores accumulate in float64; ties in the final ranking are broken by a permutation drawn
  from the run's seed, so different seeds of a tied run really differ (the code used float16).
- An unparsable answer scores 0 for its query only and counts towards `parse_failure_rate`; the
  code dropped the whole episode and gave its demonstrations nothing.
- Token spans come from one tokenisation of each whole chat-templated row with character
  offsets, so they are exact for any tokenizer (the code tokenised pieces separately and
  subtracted 1 for a BOS token: off by one on Llama, drifting on Qwen).
- Layer l's attention is captured inside the forward pass that scoring runs anyway, with public
  transformers APIs (attention.py); no second forward pass.
- Decoding is greedy by construction and stops per row once its answer is complete.
- A prompt longer than the model's context drops demonstrations for that episode (counted).
- w_i = n * a_i / sum_j a_j over the episode's n demonstrations, i.e. the paper's normalised
  weight times n. For full episodes this is a constant factor (same ranking); it keeps the
  shorter last chunk and truncated episodes from inflating their demonstrations' weights, and
  makes "w/o Attn" (w_i = 1) the raw episode score on the same scale.

Modules: attention (the capture), prompts (layouts, token spans, reading answers), episodes
(planning, accumulation, the resumable log), runner (prefill, decoding, teacher forcing),
settings (the method config, checked), episode_records (an episode's log line), log_scores (the
log read back into scores), method (the scoring run).
"""

from dwbench.methods.data_whisperer.method import DataWhisperer
from dwbench.methods.data_whisperer.settings import Settings

__all__ = ["DataWhisperer", "Settings"]
