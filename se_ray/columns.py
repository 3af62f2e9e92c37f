"""Column names of the datasets se-ray reads and writes (one place, used everywhere)."""

# questions
ID = "id"
QUESTION = "question"
REFERENCES = "references"
CONTEXT = "context"

# sample stage
SAMPLES = "samples"
SAMPLE_LOGPROBS = "sample_logprobs"  # mean token log-prob per sample
SAMPLE_LOGPROB_SUMS = "sample_logprob_sums"
SAMPLE_TOKEN_COUNTS = "sample_token_counts"
STANDARD_ANSWER = "standard_answer"
STANDARD_LOGPROB = "standard_logprob"
NUM_GENERATED = "num_generated"  # samples actually generated (early stop may save some)

# entropy stage
CLUSTER_IDS = "cluster_ids"
SEMANTIC_ENTROPY = "semantic_entropy"  # discrete, nats
REGULAR_SEMANTIC_ENTROPY = "regular_semantic_entropy"
EXACT_ENTROPY = "exact_entropy"
ENTAILMENT_CALLS = "entailment_calls"

# label stage
TAU = "tau"
ABSTAIN = "abstain"
TARGET = "target"
LABEL_METHOD = "label_method"

QUESTION_COLUMNS = (ID, QUESTION, REFERENCES, CONTEXT)
LABEL_COLUMNS = (
    ID,
    QUESTION,
    REFERENCES,
    CONTEXT,
    SAMPLES,
    SAMPLE_LOGPROBS,
    SAMPLE_LOGPROB_SUMS,
    SAMPLE_TOKEN_COUNTS,
    STANDARD_ANSWER,
    STANDARD_LOGPROB,
    NUM_GENERATED,
    CLUSTER_IDS,
    SEMANTIC_ENTROPY,
    REGULAR_SEMANTIC_ENTROPY,
    EXACT_ENTROPY,
    ENTAILMENT_CALLS,
    TAU,
    ABSTAIN,
    TARGET,
    LABEL_METHOD,
)
