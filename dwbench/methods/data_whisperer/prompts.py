"""Episode prompts, their exact token spans, and reading the selector's answers.

Two layouts (`method.query_layout`):
- `joint` (the paper's and the released code's): one user turn holds a header, the
  demonstrations ("Question: x\\nAnswer:\\ny"), an instruction and "Question k: x" for each
  query; the assistant turn is pre-filled with "Answer 1:" and one completion answers every
  query (it is read with the pre-fill in front: `joint_reply`). The query block, whose rows
  weigh the demonstrations, runs from the instruction to the end of the prompt, as in the
  released code.
- `separate`: the demonstrations are earlier chat turns (user: question, assistant: answer) and
  each query is its own row continuing them, written exactly as a demonstration's question
  (a user turn, then the assistant header). All rows of an episode share the demonstration
  prefix, which is computed once. A row's query block runs from its question to the end of its
  prompt. Small models answer far more queries this way (no numbered format to keep).

Every row's prompt is tokenised once, whole, with character offsets, so token spans are exact
for any tokenizer; the rows of an episode must agree on the prefix's tokens (they do wherever
the chat template puts a special token at the turn boundary; otherwise the episode is refused).

With `query_scoring=likelihood` (teacher forcing) each row carries one query's gold answer
after its prompt, as a `continuation` tokenised after the prompt's own tokens, so the prompt's
tokens are exactly those generation sees even where the tokenizer would merge the prompt's last
characters with the answer's first (tiktoken-style vocabularies such as Llama 3's have ":\\n"
as one token). `answer_chars` locate the gold answer and `number_chars` its final number. The
joint layout then has one row per query, each the generating prompt with "Answer k:" in place
of "Answer 1:" and gold answer k after it: no query is conditioned on another query's gold
answer. Its shared prefix runs to the end of the user turn, so the query block lies mostly in
the prefix, and only row 1 (the generating row's exact tokens) weighs the demonstrations.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from transformers import PreTrainedTokenizerBase

from dwbench.chat import prompt_text
from dwbench.data.answers import parse_predicted_number
from dwbench.data.records import Example
from dwbench.errors import ConfigError, DwbenchError

QUERY_LAYOUTS = ("joint", "separate")
NUMERIC_METRIC = "exact_match_number"
DEMOS_HEADER = "Below are solved examples."
ANSWER_PREFILL = "Answer 1:"  # the joint reply starts here; completions are read with it in front
NUMERIC_INSTRUCTION = (
    "Now solve each of the questions below in the same way. Start each solution with "
    '"Answer k:" on its own line, where k is the number of the question, show the steps, and '
    'end the solution with a line "#### <number>" that gives the final answer.'
)
TEXT_INSTRUCTION = (
    "Now answer each of the questions below in the same way. Start each answer with "
    '"Answer k:" on its own line, where k is the number of the question, and write the answer '
    "as one paragraph."
)
# "Answer 3:", "**Answer 3:**", "answer 3 :"; digits right after the word, then a colon.
_ANSWER_MARKER = re.compile(r"\banswer\s*(\d+)\s*\**\s*:", re.IGNORECASE)
_FINAL_LINE = re.compile(r"####[^\n]*\n")
_PARAGRAPH_END = re.compile(r"\S\s*?\n\s*\n")
_QUESTION_LINE = re.compile(r"[ \t*#>]*question\b", re.IGNORECASE)  # the model asks anew
_NEW_QUESTION = re.compile(r"(?:^|\n)[ \t*#>]*question\b", re.IGNORECASE)
_GOLD_NUMBER = re.compile(r"####[ \t]*([^\n]*\S)")


# --- prompts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowText:
    """One batch row: the shared prefix, then its query block (and a gold answer, if forced).

    Character spans are in `text + continuation`.
    """

    text: str  # the prompt, tokenised whole
    query_chars: tuple[int, int] | None  # the rows whose attention weighs the demonstrations
    continuation: str = ""  # teacher-forced after the prompt's tokens (likelihood)
    answer_chars: tuple[tuple[int, int], ...] = ()  # the gold answer in the continuation
    number_chars: tuple[tuple[int, int] | None, ...] = ()  # its final number (None without ####)


@dataclass(frozen=True)
class EpisodePrompt:
    prefix_chars: int  # every row starts with the same text[:prefix_chars] (the demonstrations)
    demo_chars: tuple[tuple[int, int], ...]  # each demonstration, [start, end) in that prefix
    rows: tuple[RowText, ...]


def demonstration_text(example: Example) -> str:
    return f"Question: {example.prompt.strip()}\nAnswer:\n{example.response.strip()}"


def default_instruction(metric: str) -> str:
    return NUMERIC_INSTRUCTION if metric == NUMERIC_METRIC else TEXT_INSTRUCTION


def _gold_number(text: str, start: int) -> tuple[int, int] | None:
    """Characters of the final number in a gold answer placed at `start` (None without ####)."""
    found = list(_GOLD_NUMBER.finditer(text))
    if not found:
        return None
    return start + found[-1].start(1), start + found[-1].end(1)


def has_final_answer(answer: str) -> bool:
    """Whether a gold answer has the `#### n` line that `likelihood_span=final` scores."""
    return _gold_number(answer, 0) is not None


def _gold_row(
    prompt: str, query_chars: tuple[int, int] | None, lead: str, query: Example
) -> RowText:
    """A teacher-forced row: the prompt, then `lead` and the query's gold answer."""
    answer = query.response.strip()
    start = len(prompt) + len(lead)
    return RowText(
        prompt,
        query_chars,
        lead + answer,
        ((start, start + len(answer)),),
        (_gold_number(answer, start),),
    )


def build_joint_prompt(
    tokenizer: PreTrainedTokenizerBase,
    demos: Sequence[Example],
    queries: Sequence[Example],
    instruction: str,
    gold: bool = False,
) -> EpisodePrompt:
    """Demonstrations, the instruction and numbered questions as one user turn, one row.

    The user message is assembled from pieces with their character ranges recorded, then placed
    in the model's chat template; the ranges are shifted by where the message lands there. The
    assistant turn starts with the first answer's marker (`ANSWER_PREFILL`): small models
    follow the numbered format far more reliably when their reply already begins with it.
    With `gold`, one row per query: the reply starts with "Answer k:" and continues with gold
    answer k on its own line; the rows share everything before the reply, and row 1, whose
    prompt is the generating row's, is the one whose query block weighs the demonstrations.
    """
    pieces = [DEMOS_HEADER]
    cursor = len(DEMOS_HEADER)
    demo_chars = []
    for demo in demos:
        text = demonstration_text(demo)
        cursor += 2
        demo_chars.append((cursor, cursor + len(text)))
        pieces.append(text)
        cursor += len(text)
    query_start = cursor + 2
    pieces.append(instruction)
    pieces += [f"Question {k}: {query.prompt.strip()}" for k, query in enumerate(queries, 1)]
    message = "\n\n".join(pieces)
    chat = prompt_text(tokenizer, message)
    offset = chat.find(message)
    if offset < 0:
        raise ConfigError(
            "the model's chat template changes the user message it renders, so Data Whisperer "
            "cannot locate the demonstrations in the prompt; use another selector model."
        )
    text = chat + ANSWER_PREFILL
    query_chars = (offset + query_start, len(text))
    demo_spans = tuple((offset + s, offset + e) for s, e in demo_chars)
    if not gold:
        return EpisodePrompt(offset + query_start, demo_spans, (RowText(text, query_chars),))
    rows = tuple(
        _gold_row(chat + f"Answer {k}:", query_chars if k == 1 else None, "\n", query)
        for k, query in enumerate(queries, 1)
    )
    return EpisodePrompt(len(chat), demo_spans, rows)


def _find(text: str, piece: str, start: int) -> int:
    at = text.find(piece, start)
    if at < 0:
        raise ConfigError(
            "the model's chat template changes the messages it renders, so Data Whisperer "
            "cannot locate the demonstrations in the prompt; use another selector model."
        )
    return at


def build_separate_prompt(
    tokenizer: PreTrainedTokenizerBase,
    demos: Sequence[Example],
    queries: Sequence[Example],
    instruction: str | None,
    gold: bool = False,
) -> EpisodePrompt:
    """Demonstrations as earlier chat turns; one row per query, written as they are.

    `instruction`, when given, is a system message before the demonstrations. With `gold`, each
    row continues with its query's reference answer as the assistant's reply (no end-of-turn).
    """
    history = [{"role": "system", "content": instruction}] if instruction else []
    for demo in demos:
        history += [
            {"role": "user", "content": demo.prompt.strip()},
            {"role": "assistant", "content": demo.response.strip()},
        ]
    prefix = tokenizer.apply_chat_template(history, tokenize=False) if history else ""
    demo_chars, cursor = [], 0
    for demo in demos:
        start = _find(prefix, demo.prompt.strip(), cursor)
        cursor = _find(prefix, demo.response.strip(), start) + len(demo.response.strip())
        demo_chars.append((start, cursor))
    rows = []
    for query in queries:
        question = query.prompt.strip()
        text = tokenizer.apply_chat_template(
            [*history, {"role": "user", "content": question}],
            tokenize=False,
            add_generation_prompt=True,
        )
        if not text.startswith(prefix):
            raise ConfigError(
                "the model's chat template renders earlier turns differently once a new turn "
                "follows, so the demonstrations cannot be shared by the query rows; use "
                "method.query_layout=joint or another selector model."
            )
        query_chars = (_find(text, question, len(prefix)), len(text))
        rows.append(_gold_row(text, query_chars, "", query) if gold else RowText(text, query_chars))
    return EpisodePrompt(prefix_chars=len(prefix), demo_chars=tuple(demo_chars), rows=tuple(rows))


# --- token spans -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedRow:
    """A row's tokens after the shared prefix; spans are in these suffix coordinates (a query
    block that starts in the prefix starts below 0)."""

    suffix_ids: tuple[int, ...]
    query_tokens: tuple[int, int] | None  # None: the row does not weigh the demonstrations
    answer_tokens: tuple[tuple[int, int], ...] = ()
    number_tokens: tuple[tuple[int, int] | None, ...] = ()
    hidden_demo: int | None = None  # leave-one-out: this demonstration's tokens are masked out


@dataclass(frozen=True)
class EncodedEpisode:
    """The shared prefix's tokens, each demonstration's token span in it, and the rows."""

    prefix_ids: tuple[int, ...]
    demo_tokens: tuple[tuple[int, int], ...]
    rows: tuple[EncodedRow, ...]

    def longest_row(self) -> int:
        return len(self.prefix_ids) + max(len(row.suffix_ids) for row in self.rows)

    def with_knockouts(self) -> EncodedEpisode:
        """The rows again once per demonstration i, each blind to i's tokens (leave-one-out).

        Row order: the n_q rows as they are, then demonstration 0's n_q blind copies, then 1's,
        and so on. The copies share the prefix computed once (the runner's 4D mask hides i's
        keys from them), so the with/without pairs cost one extra row each, not an extra
        prefix. It is a knockout, not a deletion: demonstrations after i still carry what they
        read from i, and positions keep i's gap. Copies weigh no demonstration (query_tokens
        None). Every query block must lie in the row itself (the separate layout).
        """
        if any(row.query_tokens is None or row.query_tokens[0] < 0 for row in self.rows):
            raise ConfigError(
                "method.leave_one_out=true hides a demonstration from each query row, which "
                "needs the query in its own row: set method.query_layout=separate."
            )
        blind = tuple(
            replace(row, query_tokens=None, hidden_demo=i)
            for i in range(len(self.demo_tokens))
            for row in self.rows
        )
        return replace(self, rows=self.rows + blind)


def char_to_token_span(offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """The tokens that overlap characters [start, end); empty-width tokens never count."""
    inside = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
    if not inside:
        raise DwbenchError(f"no token covers characters {start}..{end} of the prompt")
    return inside[0], inside[-1] + 1


Tokens = tuple[list[int], list[tuple[int, int]]]  # ids and their character offsets


def _tokens(tokenizer: PreTrainedTokenizerBase, text: str, shift: int = 0) -> Tokens:
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [(s + shift, e + shift) for s, e in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), offsets


def encode_row(tokenizer: PreTrainedTokenizerBase, row: RowText) -> Tokens:
    """The prompt's tokens, exactly as generation sees them, then the continuation's.

    Where the whole row's tokens begin with the prompt's, the rest are the continuation's
    tokens in context. Otherwise a token would straddle the two (":" + "\\n" merged), and the
    continuation is tokenised on its own instead; this keeps the in-context tokens wherever they
    can be had, since some tokenizers mark the start of a text they are given alone
    (SentencePiece's dummy-prefix "▁").
    """
    ids, offsets = _tokens(tokenizer, row.text)
    if not row.continuation:
        return ids, offsets
    whole_ids, whole_offsets = _tokens(tokenizer, row.text + row.continuation)
    if whole_ids[: len(ids)] == ids:
        return whole_ids, whole_offsets
    more_ids, more_offsets = _tokens(tokenizer, row.continuation, len(row.text))
    return ids + more_ids, offsets + more_offsets


def encode_episode(tokenizer: PreTrainedTokenizerBase, prompt: EpisodePrompt) -> EncodedEpisode:
    """One tokenisation per row; the prefix is the tokens that end inside the shared text."""
    encoded = [encode_row(tokenizer, row) for row in prompt.rows]
    first_ids, offsets = encoded[0]
    n_prefix = next(
        (i for i, (_, e) in enumerate(offsets) if e > prompt.prefix_chars), len(offsets)
    )
    prefix_ids = tuple(first_ids[:n_prefix])
    if any(tuple(ids[:n_prefix]) != prefix_ids for ids, _ in encoded[1:]):
        raise DwbenchError(
            "the tokenizer splits the shared part of an episode's rows differently in different "
            "rows, so it cannot be computed once; use method.query_layout=joint with "
            "method.query_scoring=generate"
        )
    demo_tokens = tuple(char_to_token_span(offsets, s, e) for s, e in prompt.demo_chars)
    if any(end > n_prefix for _, end in demo_tokens):
        raise DwbenchError("a demonstration's last token runs into the query block")
    rows = []
    for row, (ids, row_offsets) in zip(prompt.rows, encoded, strict=True):

        def span(chars: tuple[int, int], offsets: list = row_offsets) -> tuple[int, int]:
            start, end = char_to_token_span(offsets, *chars)
            return start - n_prefix, end - n_prefix

        rows.append(
            EncodedRow(
                suffix_ids=tuple(ids[n_prefix:]),
                query_tokens=None if row.query_chars is None else span(row.query_chars),
                answer_tokens=tuple(span(chars) for chars in row.answer_chars),
                number_tokens=tuple(None if c is None else span(c) for c in row.number_chars),
            )
        )
    return EncodedEpisode(prefix_ids, demo_tokens, tuple(rows))


# --- answers -----------------------------------------------------------------------------------


def _markers(body: str, n_queries: int) -> list[tuple[int, int, int]]:
    """Accepted "Answer k:" markers, k increasing: (k, marker start, marker end)."""
    starts: list[tuple[int, int, int]] = []
    for match in _ANSWER_MARKER.finditer(body):
        k = int(match.group(1))
        if (starts[-1][0] if starts else 0) < k <= n_queries:
            starts.append((k, match.start(), match.end()))
    return starts


def split_answers(
    text: str, n_queries: int, numeric: bool, finished: bool = True
) -> list[str | None]:
    """Each answer's text in a joint completion, or None where the completion has none.

    Explicit markers are trusted: once the completion writes "Answer k:" for any k > 1, answer
    k runs from its marker to the next accepted marker (increasing k), so a second `####` line
    inside one answer ("#### 5\nSo the final answer is\n#### 5") stays in that answer.
    Numeric answers are cut after their first completed `####` line (the number they commit to,
    as in GSM8K's strict match). A completion with no marker after the pre-filled "Answer 1:"
    is read as the released code read it: the i-th block ending with a `####` line is answer i.
    `finished` says generation has ended, so a `####` line at the very end is complete too.
    """
    body = text + "\n" if numeric and finished else text
    answers: list[str | None] = [None] * n_queries
    starts = _markers(body, n_queries)
    if numeric and not any(k > 1 for k, _, _ in starts):
        begin = starts[0][2] if starts else 0
        for number, line in enumerate(_FINAL_LINE.finditer(body, begin), 1):
            if number > n_queries:
                break
            answers[number - 1] = body[begin : line.end()]
            begin = line.end()
        return answers
    for j, (k, _, body_start) in enumerate(starts):
        body_end = starts[j + 1][1] if j + 1 < len(starts) else len(body)
        answer = body[body_start:body_end]
        if numeric:
            line = _FINAL_LINE.search(answer)
            answers[k - 1] = None if line is None else answer[: line.end()]
        else:
            answers[k - 1] = answer
    return answers


def answers_complete(text: str, n_queries: int, numeric: bool) -> bool:
    """Whether a joint completion's last answer is finished: its `####` line or paragraph.

    With several numeric queries only a marked last answer counts: an unmarked `####` block
    may restate the previous answer, and stopping on it would cut off the real last answer (a
    completion without markers runs to the cap and is read in order afterwards).
    """
    if numeric and n_queries > 1 and not any(k > 1 for k, _, _ in _markers(text, n_queries)):
        return False
    last = split_answers(text, n_queries, numeric, finished=False)[-1]
    if last is None:
        return False
    return numeric or _PARAGRAPH_END.search(last) is not None


def separate_answer(text: str) -> str:
    """A separate row's answer: its completion up to any question the model starts next."""
    found = _NEW_QUESTION.search(text)
    return text if found is None else text[: found.start()]


def answer_failed(answer: str | None, numeric: bool) -> bool:
    """No answer, an empty one, or a numeric one without a parsable `####` number."""
    return (
        answer is None or not answer.strip() or (numeric and parse_predicted_number(answer) is None)
    )


def joint_reply(completion: str) -> str:
    """The whole joint reply: the pre-filled "Answer 1:", then the completion.

    A completion holds only the new tokens, so without the prefill its first answer has no
    marker: "... Answer 2: ..." would lose answer 1 and a marker-free text answer would be
    read as no answer at all. A completion that writes "Answer 1:" again is taken as it is (the
    marker twice would put the second one into answer 1's text). Both the stop check and
    scoring read this text.
    """
    restated = _ANSWER_MARKER.match(completion.lstrip(" \t\r\n*#"))
    return completion if restated and restated.group(1) == "1" else ANSWER_PREFILL + completion


class JointStop:
    """A joint row is done once its n_q-th answer is complete; checked when a line ends."""

    def __init__(self, n_queries: int, numeric: bool) -> None:
        self.n_queries = n_queries
        self.numeric = numeric
        self.completion = ""

    def feed(self, piece: str) -> bool:
        self.completion += piece
        return "\n" in piece and answers_complete(
            joint_reply(self.completion), self.n_queries, self.numeric
        )


class SeparateStop:
    """A separate row is done at its `####` line's end (numeric) or when a new question starts.

    Only the current line is examined as pieces arrive, so the check costs O(line), not
    O(completion), per token.
    """

    def __init__(self, numeric: bool) -> None:
        self.numeric = numeric
        self.line = ""

    def feed(self, piece: str) -> bool:
        *done_lines, self.line = (self.line + piece).split("\n")
        if self.numeric and any("####" in line for line in done_lines):
            return True
        return any(_QUESTION_LINE.match(line) for line in (*done_lines, self.line))
