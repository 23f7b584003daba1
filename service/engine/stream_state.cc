#include "service/engine/stream_state.h"

#include <algorithm>

#include "absl/container/inlined_vector.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "kernels/attention.h"
#include "kernels/cpu/dtype.h"
#include "kernels/page_score.h"
#include "kernels/selection.h"

namespace kvmem {
namespace {

RotaryParams ToRotaryParams(const RotaryConfig& r) {
  RotaryParams p;
  p.base = r.base_theta;
  p.rotary_dims = r.rotary_dims;
  p.pairing =
      r.interleaved ? RotaryPairing::kInterleaved : RotaryPairing::kHalfSplit;
  p.scaling = r.scaling;
  p.factor = r.scaling_factor;
  if (r.scaling == RotaryScaling::kLlama3) {
    p.low_freq_factor = r.low_freq_factor;
    p.high_freq_factor = r.high_freq_factor;
    p.original_max_positions = double(r.original_max_positions);
  }
  return p;
}

}  // namespace

absl::StatusOr<StreamConfig> StreamConfig::FromSession(
    const SessionConfig& config) {
  const ModelShape& shape = config.shape;
  const CachePolicy& policy = config.policy;
  StreamConfig c;
  c.cascade.sinks = policy.sinks;
  c.cascade.cascades = policy.cascades;
  c.cascade.window = policy.window;
  c.cascade.eager_fill = policy.eager_fill;
  c.cascade.beta = policy.ema_beta;
  c.head_dim = shape.head_dim;
  c.group = shape.query_heads / shape.kv_heads;
  c.dtype = shape.dtype;
  c.page_tokens = policy.page_tokens;
  c.budget_tokens = policy.step_budget_tokens;
  c.recent_tokens = policy.recent_tokens;
  c.softmax_scale = EffectiveSoftmaxScale(shape);
  c.reduction = policy.score_reduction;
  c.recall = policy.recall;
  c.cache_rank = policy.positions_mode == PositionsMode::kCacheRank;
  if (c.cache_rank) {
    RotaryParams rotary = ToRotaryParams(shape.rotary);
    KVMEM_ASSIGN_OR_RETURN(c.inv_freq,
                           RotaryInverseFrequencies(rotary, c.head_dim));
    c.pairing = rotary.pairing;
    KVMEM_ASSIGN_OR_RETURN(c.digest_kind,
                           RotationInvariantDigestKind(rotary, c.head_dim));
  }
  return c;
}

namespace {

// Host bytes of one spilled token in the open page, and of one sealed
// page's reference (digest and bookkeeping).
int64_t OpenTokenBytes(const StreamConfig& c) {
  return 8 + 2 * int64_t{c.row_bytes()};
}
int64_t SealedRefBytes(const StreamConfig& c) {
  return int64_t{kDigestRows} * c.head_dim * 4 + int64_t{sizeof(SealedPageRef)};
}

}  // namespace

int64_t StreamState::FixedBytes(const StreamConfig& c) {
  const int64_t slots =
      c.cascade.sinks + int64_t{c.cascade.cascades} * c.cascade.window;
  const int64_t pages = slots / c.page_tokens + c.cascade.cascades + 1;
  // Per slot: key and value rows, position, score, page index.
  return slots * (2 * int64_t{c.row_bytes()} + 8 + 4 + 4) +
         pages * (int64_t{kDigestRows} * c.head_dim * 4 + 9);
}

int64_t StreamState::StepGrowthBytes(const StreamConfig& c, int tokens) {
  // The open page gains at most `tokens` tokens; each page sealed meanwhile
  // leaves a reference.
  return tokens * OpenTokenBytes(c) +
         (tokens / c.page_tokens + 1) * SealedRefBytes(c);
}

absl::StatusOr<StreamState> StreamState::Create(const StreamConfig* config) {
  KVMEM_ASSIGN_OR_RETURN(
      CascadeStream cascade,
      CascadeStream::Create(config->cascade, config->row_bytes()));
  return StreamState(config, std::move(cascade));
}

StreamState::StreamState(const StreamConfig* config, CascadeStream cascade)
    : config_(config), cascade_(std::move(cascade)) {
  // selection.md § Pages: the sinks form ⌈S/P⌉ pages, each cascade its own.
  const int S = config->cascade.sinks;
  const int W = config->cascade.window;
  const int P = config->page_tokens;
  auto add_pages = [&](int first, int count) {
    for (int at = 0; at < count; at += P) {
      page_first_slot_.push_back(first + at);
      page_slots_.push_back(std::min(P, count - at));
    }
  };
  add_pages(0, S);
  for (int i = 0; i < config->cascade.cascades; ++i) add_pages(S + i * W, W);
  slot_page_.resize(size_t(cascade_.num_slots()));
  for (int p = 0; p < num_resident_pages(); ++p) {
    for (int s = 0; s < page_slots_[p]; ++s) {
      slot_page_[page_first_slot_[p] + s] = p;
    }
  }
  page_digests_.assign(
      size_t(num_resident_pages()) * kDigestRows * config->head_dim, 0.0f);
  page_has_digest_.assign(size_t(num_resident_pages()), 0);
  open_.row_bytes = uint32_t(config->row_bytes());
}

absl::Status StreamState::AdoptCascade(CascadeStream::Snapshot snapshot) {
  KVMEM_ASSIGN_OR_RETURN(
      cascade_, CascadeStream::Import(config_->cascade, config_->row_bytes(),
                                      std::move(snapshot)));
  std::vector<int> all(static_cast<size_t>(cascade_.num_slots()));
  for (size_t i = 0; i < all.size(); ++i) all[i] = int(i);
  RefreshDigests(all);
  return absl::OkStatus();
}

void StreamState::SpillEvicted(int64_t position, absl::string_view key,
                               absl::string_view value,
                               StreamStepOutput* output) {
  // Once a step per KV head of every device-owned entry: no copy into an
  // EvictedTokens, no scratch on the heap for the usual head sizes.
  absl::InlinedVector<float, 256> scratch(size_t(config_->head_dim));
  SpillRow(position, reinterpret_cast<const uint8_t*>(key.data()),
           reinterpret_cast<const uint8_t*>(value.data()),
           absl::MakeSpan(scratch), output);
  RecountSpillBytes();
}

void StreamState::AddSealedPage(SealedPageRef page) {
  sealed_.push_back(std::move(page));
  RecountSpillBytes();
}

void StreamState::RecountSpillBytes() {
  spill_bytes_ = int64_t(sealed_.size()) * SealedRefBytes(*config_) +
                 int64_t(open_.positions.size()) * OpenTokenBytes(*config_);
}

void StreamState::RefreshDigests(absl::Span<const int> slots) {
  const int D = config_->head_dim;
  int last_page = -1;
  for (int slot : slots) {  // ascending, so a page's slots are adjacent
    const int page = slot_page_[slot];
    if (page == last_page) continue;
    last_page = page;
    const int first = page_first_slot_[page];
    const int count = page_slots_[page];
    std::vector<uint8_t> occupied(size_t(count), 0);
    bool any = false;
    for (int s = 0; s < count; ++s) {
      occupied[s] = cascade_.slot_position(first + s) >= 0;
      any = any || occupied[s];
    }
    page_has_digest_[page] = any;
    if (!any) continue;
    // A page's slots are consecutive, so its key rows are one run of bytes.
    absl::Span<const uint8_t> keys(cascade_.key_row(first).data(),
                                   size_t(count) * config_->row_bytes());
    absl::Span<float> digest(&page_digests_[size_t(page) * kDigestRows * D],
                             kDigestRows * D);
    // Sizes are the stream's own, so this cannot fail.
    cpu::ComputePageDigest(keys, config_->dtype, D, occupied,
                           config_->digest_kind, digest)
        .IgnoreError();
  }
}

void StreamState::Spill(const EvictedTokens& evicted,
                        StreamStepOutput* output) {
  const size_t row = size_t(config_->row_bytes());
  std::vector<float> key(static_cast<size_t>(config_->head_dim));
  for (size_t e = 0; e < evicted.positions.size(); ++e) {
    SpillRow(evicted.positions[e], &evicted.keys[e * row],
             &evicted.values[e * row], absl::MakeSpan(key), output);
  }
  RecountSpillBytes();
}

void StreamState::SpillRow(int64_t position, const uint8_t* key_row,
                           const uint8_t* value_row, absl::Span<float> key,
                           StreamStepOutput* output) {
  const int D = config_->head_dim;
  const size_t row = size_t(config_->row_bytes());
  if (open_.positions.empty()) {
    // A page's rows, grown once rather than doubling up to a page.
    const size_t page = size_t(config_->page_tokens);
    open_.positions.reserve(page);
    open_.keys.reserve(page * row);
    open_.values.reserve(page * row);
  }
  open_.positions.push_back(position);
  open_.keys.append(reinterpret_cast<const char*>(key_row), row);
  open_.values.append(reinterpret_cast<const char*>(value_row), row);
  cpu::LoadFloats(key_row, config_->dtype, key);
  // Sizes are the stream's own, so neither call can fail.
  if (open_.positions.size() == 1) {
    open_.digest.assign(size_t(kDigestRows) * D, 0.0f);
    cpu::SeedPageDigest(key, config_->digest_kind, absl::MakeSpan(open_.digest))
        .IgnoreError();
  } else {
    cpu::ExtendPageDigest(key, config_->digest_kind,
                          absl::MakeSpan(open_.digest))
        .IgnoreError();
  }
  ++spilled_tokens_;
  if (int(open_.positions.size()) == config_->page_tokens) {
    sealed_.push_back({next_page_seq_, config_->page_tokens, open_.digest});
    output->sealed_seqs.push_back(next_page_seq_);
    output->sealed.push_back(
        std::make_shared<const storage::SpillPage>(std::move(open_)));
    ++next_page_seq_;
    open_ = storage::SpillPage();
    open_.row_bytes = uint32_t(row);
  }
}

std::vector<int> StreamState::ResidentSlots() const {
  std::vector<int> slots;
  for (int s = 0; s < cascade_.num_slots(); ++s) {
    if (cascade_.slot_position(s) >= 0) slots.push_back(s);
  }
  return slots;
}

absl::Status StreamState::CheckInput(const StreamStepInput& in) const {
  const int T = in.num_tokens;
  const size_t row = size_t(config_->row_bytes());
  if (T < 1 || in.keys.size() != T * row || in.values.size() != T * row ||
      (!in.queries.empty() &&
       in.queries.size() != size_t(T) * config_->group * config_->head_dim)) {
    return absl::InvalidArgumentError(
        absl::StrCat("stream step: sizes do not match T=", T,
                     " G=", config_->group, " D=", config_->head_dim));
  }
  if (in.position != tokens_seen()) {
    return absl::FailedPreconditionError(
        absl::StrCat("position ", in.position, ", expected ", tokens_seen()));
  }
  return absl::OkStatus();
}

absl::StatusOr<StreamSelection> StreamState::Select(
    bool dense_layer, const StreamStepInput& in) const {
  KVMEM_RETURN_IF_ERROR(CheckInput(in));
  StreamSelection sel;
  if (in.queries.empty()) return sel;  // no query, no attention
  if (in.num_tokens > 1) {             // a chunk: dense over the residents
    sel.slots = ResidentSlots();
    return sel;
  }

  const int N = cascade_.num_slots();
  const int S = config_->cascade.sinks;
  const int D = config_->head_dim;
  const int64_t B = config_->budget_tokens;
  const bool recall = config_->recall;
  // Every resident slot, for the dense answers below; the sparse one
  // builds its own list.
  const int64_t resident = cascade_.ResidentCount();
  const int64_t spilled = recall ? spilled_tokens_ : 0;
  const int num_sealed = recall ? int(sealed_.size()) : 0;
  const bool open_in = recall && !open_.positions.empty();

  // Candidates are numbered: resident pages [0, R), sealed pages [R, R+K),
  // the open page R+K: also their tie order (selection.md step 4). Scores
  // are computed where the digests lie (no copies: a 4K-token stream's
  // digests are 256 KiB).
  std::vector<int> cand;  // resident page id, or R + spilled index
  std::vector<int64_t> fresh;
  std::vector<float> scores;
  // Inputs are the stream's own, consistent by construction.
  auto score = [&](absl::Span<const float> digests, absl::Span<float> out) {
    cpu::ScorePages(in.queries, D, digests, config_->digest_kind,
                    GroupReduction::kMax, out)
        .IgnoreError();
  };
  auto add_spilled = [&] {
    auto add = [&](int candidate, int64_t tokens,
                   const std::vector<float>& digest) {
      cand.push_back(candidate);
      fresh.push_back(tokens);
      scores.push_back(0.0f);
      score(digest, absl::MakeSpan(&scores.back(), 1));
    };
    for (int p = 0; p < num_sealed; ++p) {
      add(num_resident_pages() + p, sealed_[p].tokens, sealed_[p].digest);
    }
    if (open_in) {
      add(num_resident_pages() + num_sealed, int64_t(open_.positions.size()),
          open_.digest);
    }
  };
  auto fill = [&](int64_t always_in, int64_t budget) {
    std::vector<uint8_t> selected(cand.size(), 0);
    std::vector<int64_t> order(cand.begin(), cand.end());
    cpu::FillSelection(always_in, {scores, fresh, order}, budget,
                       absl::MakeSpan(selected))
        .IgnoreError();
    return selected;
  };
  auto take_spilled = [&](const std::vector<uint8_t>& selected, size_t from) {
    for (size_t c = from; c < cand.size(); ++c) {
      if (!selected[c]) continue;
      const int p = cand[c] - num_resident_pages();
      if (p < num_sealed) {
        sel.recall.push_back(sealed_[p].page_seq);
      } else {
        sel.open_page = true;
      }
    }
  };

  if (dense_layer) {
    // Every resident token; recall only within what B leaves after them.
    sel.slots = ResidentSlots();
    const int64_t left = B - (resident + 1);
    if (recall && left > 0) {
      add_spilled();
      if (!cand.empty()) take_spilled(fill(0, left), 0);
    }
    return sel;
  }
  if (resident + 1 + spilled <= B) {  // the dense case: everything
    sel.slots = ResidentSlots();
    for (int p = 0; p < num_sealed; ++p) {
      sel.recall.push_back(sealed_[p].page_seq);
    }
    sel.open_page = open_in;
    return sel;
  }
  // Always in: the sinks, the newest `recent` tokens of cascade 0, and the
  // new token.
  std::vector<uint8_t> always(size_t(N), 0);
  int64_t always_in = 1;
  for (int s = 0; s < S; ++s) {
    always[s] = cascade_.slot_position(s) >= 0;
    always_in += always[s];
  }
  std::vector<int> c0 = cascade_.CascadeSlots(0);
  for (int i = std::max(0, int(c0.size()) - config_->recent_tokens);
       i < int(c0.size()); ++i) {
    always[c0[i]] = 1;
    ++always_in;
  }
  // Every resident page in one call (pages without fresh tokens are
  // scored for nothing, which is cheaper than gathering the others).
  std::vector<float> page_scores(static_cast<size_t>(num_resident_pages()));
  score(page_digests_, absl::MakeSpan(page_scores));
  for (int p = 0; p < num_resident_pages(); ++p) {
    int64_t n = 0;
    for (int s = 0; s < page_slots_[p]; ++s) {
      const int slot = page_first_slot_[p] + s;
      n += cascade_.slot_position(slot) >= 0 && !always[slot];
    }
    if (n > 0) {
      cand.push_back(p);
      fresh.push_back(n);
      scores.push_back(page_scores[size_t(p)]);
    }
  }
  const size_t first_spilled = cand.size();
  add_spilled();
  std::vector<uint8_t> selected = fill(always_in, B);
  std::vector<uint8_t> page_on(size_t(num_resident_pages()), 0);
  for (size_t c = 0; c < first_spilled; ++c) page_on[cand[c]] = selected[c];
  take_spilled(selected, first_spilled);
  for (int s = 0; s < N; ++s) {
    if (cascade_.slot_position(s) >= 0 &&
        (always[s] || page_on[slot_page_[s]])) {
      sel.slots.push_back(s);
    }
  }
  return sel;
}

absl::Status StreamState::Apply(
    StepMode mode, const StreamStepInput& in, const StreamSelection& sel,
    absl::Span<const std::shared_ptr<const storage::SpillPage>> recalled,
    StreamStepOutput* output, const ExternalAttention* external) {
  KVMEM_RETURN_IF_ERROR(CheckInput(in));
  const int T = in.num_tokens;
  const int D = config_->head_dim;
  const int G = config_->group;
  const int N = cascade_.num_slots();
  const size_t row = size_t(config_->row_bytes());
  if (recalled.size() != sel.recall.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("stream step: ", recalled.size(), " recalled pages for ",
                     sel.recall.size(), " selected"));
  }
  for (const auto& page : recalled) {
    if (page == nullptr || page->row_bytes != row) {
      return absl::InvalidArgumentError(
          "stream step: a recalled page is missing or of another shape");
    }
  }
  const bool has_query = !in.queries.empty();

  if (external != nullptr && (T != 1 || !has_query)) {
    return absl::InvalidArgumentError(
        "stream step: external attention is for T = 1 decode steps with a "
        "query");
  }

  // 1. What the step attends to, ascending by original position (as the
  // device saw it, when it attended).
  std::vector<AttendedRow> own_rows;
  if (external == nullptr) own_rows = AttendedRows(sel, recalled);
  const std::vector<AttendedRow>& attended =
      external != nullptr ? external->rows : own_rows;
  if (external != nullptr && (external->probs.size() != attended.size() + 1 ||
                              external->out.size() != size_t(G) * D ||
                              external->lse.size() != size_t(G))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "stream step: external attention over ", external->probs.size(),
        " rows for ", attended.size() + 1));
  }
  auto key_row = [&](const AttendedRow& a) {
    return reinterpret_cast<const char*>(AttendedKey(a, recalled));
  };
  auto value_row = [&](const AttendedRow& a) {
    return reinterpret_cast<const char*>(AttendedValue(a, recalled));
  };

  const int64_t n_cache = int64_t(attended.size());
  const int64_t total = n_cache + T;
  // CACHE_RANK: where the keys (for the host's own attention and a FETCH
  // reply) and the query are rotated; external attention came rotated.
  std::vector<int64_t> rotary_at;
  int64_t query_base = n_cache;
  // The host gathers the keys (and rotates them) for its own attention and
  // for a FETCH reply; external attention needs neither.
  const bool host_keys =
      has_query && (external == nullptr || mode == StepMode::kFetch);
  if (config_->cache_rank && host_keys) {
    rotary_at = RotaryPositions(attended, &query_base);
  }

  // 2. Gather keys/values (before insertion moves slots), rotating in
  // CACHE_RANK mode; attend; reduce probabilities over the group.
  // Empty without a query: UpdateScores reads that as no attention.
  std::vector<float> slot_probs(has_query ? size_t(T) * N : 0, 0.0f);
  std::vector<float> self_probs(has_query ? size_t(T) * T : 0, 0.0f);
  std::string keys, values;         // [total, D] session dtype
  std::vector<float> rotated_keys;  // CACHE_RANK: [total, D] fp32
  if (host_keys) {
    keys.reserve(total * row);
    values.reserve(total * row);
    for (const AttendedRow& a : attended) {
      keys.append(key_row(a), row);
      values.append(value_row(a), row);
    }
    keys.append(reinterpret_cast<const char*>(in.keys.data()), T * row);
    values.append(reinterpret_cast<const char*>(in.values.data()), T * row);
    if (config_->cache_rank) {
      // Both the host's attention and a FETCH reply take the keys rotated.
      rotated_keys.resize(size_t(total) * D);
      cpu::LoadFloats(keys.data(), config_->dtype,
                      absl::MakeSpan(rotated_keys));
      for (int64_t j = 0; j < total; ++j) {
        const int64_t at =
            j < n_cache ? rotary_at[j] : query_base + (j - n_cache);
        cpu::RotateHeadWithFrequencies(
            config_->inv_freq, config_->pairing, at,
            absl::MakeSpan(&rotated_keys[size_t(j) * D], size_t(D)));
      }
    }
  }
  if (external != nullptr) {
    for (int64_t j = 0; j < n_cache; ++j) {
      if (attended[j].slot >= 0)
        slot_probs[attended[j].slot] = external->probs[j];
    }
    self_probs[0] = external->probs[n_cache];
    if (mode == StepMode::kAttend) {
      output->out = external->out;
      output->lse = external->lse;
    }
  } else if (has_query) {
    std::vector<float> queries(in.queries.begin(), in.queries.end());
    HeadRowsView key_view{
        absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(keys.data()),
                                  keys.size()),
        config_->dtype};
    if (config_->cache_rank) {
      for (int t = 0; t < T; ++t) {
        for (int g = 0; g < G; ++g) {
          cpu::RotateHeadWithFrequencies(
              config_->inv_freq, config_->pairing, query_base + t,
              absl::MakeSpan(&queries[(size_t(t) * G + g) * D], size_t(D)));
        }
      }
      key_view = HeadRowsView::Fp32(rotated_keys);
    }
    HeadRowsView value_view{
        absl::Span<const uint8_t>(
            reinterpret_cast<const uint8_t*>(values.data()), values.size()),
        config_->dtype};
    std::vector<float> out(size_t(T) * G * D), lse(size_t(T) * G);
    std::vector<float> probs(size_t(T) * G * total);
    KVMEM_RETURN_IF_ERROR(cpu::AttendCausalChunk(
        HeadRowsView::Fp32(queries), key_view, value_view, D, G, n_cache,
        config_->softmax_scale, absl::MakeSpan(out), absl::MakeSpan(lse),
        absl::MakeSpan(probs)));
    for (int t = 0; t < T; ++t) {
      for (int64_t j = 0; j < total; ++j) {
        const float r = ReduceGroupProbability(
            &probs[size_t(t) * G * total + j], G, total, config_->reduction);
        if (j < n_cache) {
          // Recalled tokens are attended, not re-admitted: no score.
          if (attended[j].slot >= 0) {
            slot_probs[size_t(t) * N + attended[j].slot] = r;
          }
        } else if (j - n_cache <= t) {
          self_probs[size_t(t) * T + (j - n_cache)] = r;
        }
      }
    }
    if (mode == StepMode::kAttend) {
      output->out = std::move(out);
      output->lse = std::move(lse);
    }
  }

  if (mode == StepMode::kFetch) {
    FetchedHead& f = output->fetched;
    f.positions.clear();
    for (const AttendedRow& a : attended) f.positions.push_back(a.position);
    for (int t = 0; t < T; ++t) f.positions.push_back(in.position + t);
    if (config_->cache_rank) {
      f.k.resize(size_t(total) * row);
      cpu::StoreFloats(rotated_keys, config_->dtype, f.k.data());
      f.query_rotary_positions.clear();
      for (int t = 0; t < T; ++t) {
        f.query_rotary_positions.push_back(query_base + t);
      }
    } else {
      f.k = std::move(keys);  // not read after this
    }
    f.v = std::move(values);
  }

  // 3. Scores, then insertion; what leaves the cascade is spilled.
  std::vector<float> initial(static_cast<size_t>(T));
  KVMEM_RETURN_IF_ERROR(cascade_.UpdateScores(T, slot_probs, self_probs,
                                              absl::MakeSpan(initial)));
  InsertResult inserted;
  KVMEM_RETURN_IF_ERROR(cascade_.InsertTokens(in.position, T, in.keys,
                                              in.values, initial, &inserted));
  RefreshDigests(inserted.changed_slots);
  Spill(inserted.evicted, output);
  output->changed_slots = std::move(inserted.changed_slots);
  return absl::OkStatus();
}

std::vector<int64_t> StreamState::RotaryPositions(
    absl::Span<const AttendedRow> attended, int64_t* query_base) const {
  std::vector<int64_t> ranked;
  for (int s : ResidentSlots()) ranked.push_back(cascade_.slot_position(s));
  for (const AttendedRow& a : attended) {
    if (a.slot < 0) ranked.push_back(a.position);
  }
  std::sort(ranked.begin(), ranked.end());
  std::vector<int64_t> rotary_at(attended.size());
  for (size_t j = 0; j < attended.size(); ++j) {
    rotary_at[j] =
        std::lower_bound(ranked.begin(), ranked.end(), attended[j].position) -
        ranked.begin();
  }
  *query_base = int64_t(ranked.size());
  return rotary_at;
}

std::vector<AttendedRow> StreamState::AttendedRows(
    const StreamSelection& sel,
    absl::Span<const std::shared_ptr<const storage::SpillPage>> recalled)
    const {
  // Resident rows in ascending position without touching every slot:
  // sinks hold positions in slot order, and each cascade's ring holds them
  // in slot order from its head on, then from its start (CascadeSlots), so
  // the selected slots (ascending) of a cascade are two sorted runs. Older
  // cascades first (ResidentSlotsInOrder). Spilled rows (a page holds
  // tokens in eviction order) are few and sorted here; then one merge. A
  // sort of everything, or a pass over every slot, was a large part of a
  // decode step.
  const CascadeParams& params = config_->cascade;
  std::vector<AttendedRow> resident;
  resident.reserve(sel.slots.size());
  auto emit = [&](std::vector<int>::const_iterator first,
                  std::vector<int>::const_iterator last) {
    for (; first != last; ++first) {
      resident.push_back({cascade_.slot_position(*first), *first, 0, 0});
    }
  };
  const auto begin = sel.slots.begin(), end = sel.slots.end();
  emit(begin, std::lower_bound(begin, end, params.sinks));
  for (int i = params.cascades - 1; i >= 0; --i) {
    const int base = params.sinks + i * params.window;
    const auto first = std::lower_bound(begin, end, base);
    const auto last = std::lower_bound(first, end, base + params.window);
    const auto oldest = std::lower_bound(first, last, base + cascade_.head(i));
    emit(oldest, last);
    emit(first, oldest);
  }
  auto by_position = [](const AttendedRow& a, const AttendedRow& b) {
    return a.position < b.position;
  };
  // The ring rule is the cascade's invariant; should it ever not hold, the
  // order is still made right.
  if (!std::is_sorted(resident.begin(), resident.end(), by_position)) {
    std::sort(resident.begin(), resident.end(), by_position);
  }
  std::vector<AttendedRow> spilled;
  if (sel.open_page) {
    for (size_t i = 0; i < open_.positions.size(); ++i) {
      spilled.push_back({open_.positions[i], -1, -1, int(i)});
    }
  }
  for (size_t p = 0; p < recalled.size(); ++p) {
    for (size_t i = 0; i < recalled[p]->positions.size(); ++i) {
      spilled.push_back({recalled[p]->positions[i], -1, int(p), int(i)});
    }
  }
  std::sort(spilled.begin(), spilled.end(), by_position);
  std::vector<AttendedRow> attended(resident.size() + spilled.size());
  std::merge(resident.begin(), resident.end(), spilled.begin(), spilled.end(),
             attended.begin(), by_position);
  return attended;
}

const uint8_t* StreamState::AttendedData(
    const AttendedRow& a,
    absl::Span<const std::shared_ptr<const storage::SpillPage>> recalled,
    bool value) const {
  if (a.slot >= 0) {
    return (value ? cascade_.value_row(a.slot) : cascade_.key_row(a.slot))
        .data();
  }
  const storage::SpillPage& page = a.page < 0 ? open_ : *recalled[a.page];
  const std::string& rows = value ? page.values : page.keys;
  return reinterpret_cast<const uint8_t*>(
      &rows[size_t(a.row) * size_t(config_->row_bytes())]);
}

}  // namespace kvmem
