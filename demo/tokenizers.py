"""Tokenizers for the tiny demo models, trained offline on a small domain corpus.

The real checkpoints ship a CLIP BPE (`openai/clip-vit-*`, Stable Diffusion's `tokenizer/`) and
OPT's GPT-2 byte-level BPE (`Salesforce/blip2-opt-*`). We cannot download them, so we train the
same kind of tokenizer with the `tokenizers` library on the words the embedded default uses
(attribute descriptions, prompt templates, variation phrases) and hand the resulting vocabulary
and merges to the real `CLIPTokenizer` / `GPT2Tokenizer` classes. Both are byte-level, so any text
still tokenizes (unseen words just split into more pieces; the IIR token `zwx` stays rare).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Regex, normalizers, pre_tokenizers
from transformers import CLIPTokenizer, GPT2Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2/CLIP's byte-level alphabet, in id order

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
OPT_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0..3, as in facebook/opt-*
CLIP_MAX_LENGTH = 77  # Stable Diffusion v1 and CLIP both pad/truncate prompts to 77 tokens

# CLIPTokenizer's own pre-tokenizer split; repeated here so training sees the same words.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

COLOURS = (
    "red", "blue", "green", "yellow", "black", "white", "grey", "gray", "brown", "orange",
    "purple", "pink", "navy", "beige", "khaki", "cyan", "dark", "light", "bright", "pale",
)  # fmt: skip
GARMENTS = (
    "shirt", "t-shirt", "jacket", "coat", "sweater", "hoodie", "top", "blouse", "vest", "dress",
    "skirt", "trousers", "pants", "jeans", "shorts", "shoes", "boots", "sneakers", "sandals",
    "hat", "cap", "scarf", "uniform", "suit",
)  # fmt: skip
DETAILS = (
    "striped", "plain", "checked", "dotted", "patterned", "short", "long", "hair", "bald",
    "ponytail", "backpack", "bag", "handbag", "shoulder", "umbrella", "phone", "suitcase",
    "bottle", "slim", "heavy", "tall", "small", "walking", "standing", "running", "riding",
    "bicycle", "front", "behind", "side", "street", "campus", "airport", "hall", "park",
    "man", "woman", "person", "people", "pedestrian", "photo", "image", "camera", "blurry",
)  # fmt: skip


def domain_corpus(extra: Iterable[str] = ()) -> list[str]:
    """Sentences the tokenizers are trained on: the project's default prompts and variation
    phrases, template descriptions over the attribute words, and `extra` (e.g. the descriptions
    of the training pedestrians)."""
    from core.settings.stages import CaptionConfig, FilterConfig, VariationConfig

    caption, variations, clip_filter = CaptionConfig(), VariationConfig(), FilterConfig()
    corpus = [
        caption.prompt,
        caption.prompt_template.format(iir="a", caption=""),
        caption.reference_template.format(caption=""),
        clip_filter.clip_positive,
        *clip_filter.clip_negatives,
    ]
    for phrases in variations.model_dump(exclude={"probability"}).values():
        corpus.extend(phrases)
    for i, colour in enumerate(COLOURS):
        garment, detail = GARMENTS[i % len(GARMENTS)], DETAILS[i % len(DETAILS)]
        corpus.append(f"a person with {detail} {colour} hair wearing a {colour} {garment}, carrying a {colour} bag")
    return [*corpus, " ".join([*COLOURS, *GARMENTS, *DETAILS]), *extra]


def _learn_merges(words: Counter[tuple[str, ...]], max_merges: int) -> list[tuple[str, str]]:
    """Classic BPE (Sennrich et al.): repeatedly merge the most frequent adjacent pair of
    symbols. Ties go to the smallest pair, so the merges never depend on hash order (the
    `tokenizers` trainer breaks ties by it, which made two runs disagree)."""
    vocabulary = dict(words)
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in vocabulary.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        if pairs[best] < 2:
            break
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, count in vocabulary.items():
            merged[_apply_merge(word, best) if best[0] in word else word] += count
        vocabulary = merged
    return merges


def _apply_merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _bpe(
    texts: Iterable[str], normalizer, pre_tokenizer, prefix: list[str], size: int, end_of_word: str = "",
    specials: Sequence[str] = (),
) -> tuple[dict, list]:
    """Vocabulary and merges of a BPE learned on `domain_corpus(texts)`, pre-tokenized like the final
    tokenizer and split into byte-level characters (the last one carrying `end_of_word`). The
    vocabulary holds `prefix`, then merge results in merge order (up to `size` in all), then `specials`."""
    words: Counter[tuple[str, ...]] = Counter()
    for text in domain_corpus(texts):
        normalized = normalizer.normalize_str(text) if normalizer is not None else text
        for piece, _ in pre_tokenizer.pre_tokenize_str(normalized):
            words[(*piece[:-1], piece[-1] + end_of_word)] += 1
    tokens, seen, kept = list(prefix), set(prefix), []
    for left, right in _learn_merges(words, size):
        if len(tokens) + len(specials) >= size:
            break
        if left + right not in seen:
            tokens.append(left + right)
            seen.add(left + right)
        kept.append((left, right))
    tokens += list(specials)
    return {token: i for i, token in enumerate(tokens)}, kept


def train_clip_tokenizer(texts: Iterable[str] = (), vocab_size: int = 1024) -> CLIPTokenizer:
    """A `CLIPTokenizer` (end-of-word suffix `</w>`, `<|startoftext|>`/`<|endoftext|>` as the last
    two ids, max length 77) with a BPE learned on `domain_corpus(texts)`.

    The vocabulary is laid out like CLIP's: the 256 byte characters, the same with `</w>`, the
    merged tokens in merge order, then the two special tokens (so `argmax(input_ids)` finds EOS).
    """
    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    alphabet = list(bytes_to_unicode().values())
    base = alphabet + [c + "</w>" for c in alphabet]
    if vocab_size < len(base) + 2:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the byte alphabet ({len(base) + 2})")
    vocab, merges = _bpe(texts, normalizer, pre_tokenizer, base, vocab_size, "</w>", [CLIP_BOS, CLIP_EOS])
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def train_opt_tokenizer(texts: Iterable[str] = (), vocab_size: int = 1024) -> GPT2Tokenizer:
    """An OPT-style `GPT2Tokenizer`: byte-level BPE, `<s> <pad> </s> <unk>` at ids 0..3, `</s>`
    as BOS/EOS prepended to every text (OPT's `add_bos_token`), left padding so batched
    generation continues right after each prompt."""
    pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    base = [*OPT_SPECIALS, *bytes_to_unicode().values()]
    vocab, merges = _bpe(texts, None, pre_tokenizer, base, vocab_size)
    return GPT2Tokenizer(
        vocab=vocab,
        merges=merges,
        bos_token="</s>",
        eos_token="</s>",
        unk_token="</s>",
        pad_token="<pad>",
        add_bos_token=True,
        padding_side="left",
        model_max_length=512,
    )


def write_vocab_files(tokenizer: CLIPTokenizer | GPT2Tokenizer, directory: Path) -> None:
    """Write `vocab.json` and `merges.txt` beside the `tokenizer.json` that `save_pretrained`
    writes: the file layout of the hub's CLIP and OPT tokenizers (older readers need it)."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.backend_tokenizer.model.save(str(directory))
