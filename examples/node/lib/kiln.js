// A kiln artifact runtime for Node.js, driven by kiln.json alone.
//
//   const art = await Artifact.load("out/");
//   const gen = await art.generate("The capital of France is", { maxNewTokens: 16 });
//   gen.text, gen.tokenIds
//   const vectors = await art.embed(["hello world"]);   // embedding artifacts
//
// Everything the runtime does is read from the manifest (docs/manifest.md): the session
// settings (`backend.session`), the graph's inputs (`io`), the KV-cache layout (`kv_cache`:
// names, shapes, dtype, growth axis, static slots, mask and position rules), the stop tokens
// (`generation`) and the encoder limits (`embedding`). It mirrors kiln's Python runtime
// (kiln/runtime) for one request at a time: greedy decoding, no batching.

import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

import Ajv2020 from "ajv/dist/2020.js";
import { Tokenizer } from "@huggingface/tokenizers";
import ort from "onnxruntime-node";

export const MANIFEST = "kiln.json";
export const SUPPORTED_MAJOR = 1;

export class KilnError extends Error {
  constructor(message) {
    super(message);
    this.name = "KilnError";
  }
}

// --- manifest ---------------------------------------------------------------------------

const HERE = path.dirname(fileURLToPath(import.meta.url));

/** The JSON Schema file: $KILN_MANIFEST_SCHEMA, a copy next to package.json (standalone
 *  deployments), or the one in the kiln repository this example lives in. */
export function schemaPath() {
  const candidates = [
    process.env.KILN_MANIFEST_SCHEMA,
    path.join(HERE, "..", "manifest.schema.json"),
    path.join(HERE, "..", "..", "..", "kiln", "manifest.schema.json"),
  ].filter(Boolean);
  const found = candidates.find((p) => fs.existsSync(p));
  if (!found) throw new KilnError(`cannot find manifest.schema.json (looked in: ${candidates.join(", ")}); set KILN_MANIFEST_SCHEMA`);
  return found;
}

let validator = null;

function getValidator() {
  if (validator === null) {
    const ajv = new Ajv2020({ allErrors: false, allowUnionTypes: true });
    validator = ajv.compile(JSON.parse(fs.readFileSync(schemaPath(), "utf8")));
  }
  return validator;
}

function fieldName(instancePath, extra) {
  const parts = instancePath.split("/").slice(1).map((p) => p.replaceAll("~1", "/").replaceAll("~0", "~"));
  if (extra !== undefined) parts.push(extra);
  let out = "";
  for (const part of parts) out += /^\d+$/.test(part) ? `[${part}]` : out ? `.${part}` : part;
  return out || "(top level)";
}

/** Refuse an unknown major version (before anything else), then validate against the schema. */
export function checkManifest(manifest, where = MANIFEST) {
  if (manifest === null || typeof manifest !== "object" || Array.isArray(manifest)) {
    throw new KilnError(`${where}: invalid manifest: the top level is not a JSON object`);
  }
  const version = manifest.schema_version;
  if (typeof version !== "string" || version === "") {
    throw new KilnError(`${where}: invalid manifest: schema_version is ${version === undefined ? "missing" : "not a string"} (expected "MAJOR.MINOR")`);
  }
  if (version.split(".")[0] !== String(SUPPORTED_MAJOR)) {
    throw new KilnError(`${where}: manifest schema version ${version} is not supported (this runtime reads ${SUPPORTED_MAJOR}.x)`);
  }
  const validate = getValidator();
  if (!validate(manifest)) {
    const e = validate.errors[0];
    const problem = e.keyword === "required"
      ? `${fieldName(e.instancePath, e.params.missingProperty)} is missing`
      : `${fieldName(e.instancePath)}: ${e.message}${e.keyword === "enum" ? ` (${e.params.allowedValues.map((v) => JSON.stringify(v)).join(", ")})` : ""}`;
    throw new KilnError(`${where}: invalid manifest: ${problem}`);
  }
}

export function readManifest(dir) {
  const file = path.join(dir, MANIFEST);
  if (!fs.existsSync(dir) || !fs.statSync(dir).isDirectory()) throw new KilnError(`${dir}: no such artifact directory`);
  if (!fs.existsSync(file)) throw new KilnError(`${dir}: not a kiln artifact (no ${MANIFEST})`);
  let manifest;
  try {
    manifest = JSON.parse(fs.readFileSync(file, "utf8"));
  } catch (err) {
    throw new KilnError(`${file}: invalid JSON (${err.message})`);
  }
  checkManifest(manifest, file);
  return manifest;
}

// --- the artifact's files: containment and sizes (kiln.manifest.artifact_path, verify_files) ------

/** `dir/rel` for a file the manifest names in `field`, refused (one line naming the field) unless
 *  `rel` is relative and normalised (no `..`, `.` or empty parts, no backslash, not absolute) and
 *  resolves, symlinks included, inside the artifact directory. */
export function artifactPath(dir, rel, field) {
  const where = path.join(dir, MANIFEST);
  if (typeof rel !== "string" || !rel) throw new KilnError(`${where}: ${field} is not a file name`);
  const shown = JSON.stringify(rel).slice(1, -1);
  const parts = rel.split("/");
  if (rel.startsWith("/") || rel.includes("\\") || rel.includes("\0") || (rel.length > 1 && rel[1] === ":")
      || parts.some((p) => p === "" || p === "." || p === "..")) {
    throw new KilnError(`${where}: ${field} '${shown}' is not a plain relative path inside the artifact `
      + "(absolute, '..', '.', or not normalised): refused");
  }
  const root = fs.realpathSync(dir);
  const file = path.join(dir, rel);
  let resolved;
  try {
    resolved = fs.realpathSync(file);
  } catch (err) {
    if (err.code !== "ENOENT") throw new KilnError(`${where}: ${field} '${shown}' cannot be resolved (${err.code}): refused`);
    resolved = path.join(fs.realpathSync(path.dirname(file)), path.basename(file));  // missing: its folder decides
  }
  if (resolved !== root && !resolved.startsWith(root + path.sep)) {
    throw new KilnError(`${where}: ${field} '${shown}' resolves outside the artifact directory (a symlink?): refused`);
  }
  return file;
}

/** [field, relative path] of every file the manifest names (the `files` record included). */
export function fileFields(manifest) {
  const backend = manifest.backend ?? {};
  const out = [];
  for (const key of ["model", "external_data", "params"]) {
    if (backend[key] !== undefined && backend[key] !== null) out.push([`backend.${key}`, backend[key]]);
  }
  for (const [fn, spec] of Object.entries(backend.functions ?? {})) {
    if (spec && "library" in spec) out.push([`backend.functions.${fn}.library`, spec.library]);
  }
  if (manifest.tokenizer !== undefined && manifest.tokenizer !== null) out.push(["tokenizer", manifest.tokenizer]);
  if (manifest.draft?.path !== undefined && manifest.draft?.path !== null) out.push(["draft.path", manifest.draft.path]);
  for (const rel of Object.keys(manifest.files ?? {})) out.push([`files['${rel}']`, rel]);
  return out;
}

/** Every file the manifest names inside the artifact, and every file its `files` records there
 *  with its recorded size (an artifact without `files`, from an older kiln, has no sizes to check). */
export function checkArtifactFiles(dir, manifest) {
  for (const [field, rel] of fileFields(manifest)) artifactPath(dir, rel, field);
  for (const [rel, record] of Object.entries(manifest.files ?? {})) {
    const file = path.join(dir, rel);
    if (!fs.existsSync(file) || !fs.statSync(file).isFile()) throw new KilnError(`${dir}: file ${rel} is missing (the manifest records it)`);
    const size = fs.statSync(file).size;
    if (size !== record.bytes) {
      throw new KilnError(`${dir}: file ${rel} has ${size} bytes, the manifest records ${record.bytes}: `
        + "the artifact is damaged or was changed");
    }
  }
}

// --- tensors ----------------------------------------------------------------------------

// Manifest dtypes (onnx_ir names) -> onnxruntime-node tensor types.
const ORT_TYPES = { float: "float32", float16: "float16", bfloat16: "bfloat16" };
const LEVELS = { disable: "disabled", basic: "basic", extended: "extended", all: "all" };
const PROVIDERS = { CPUExecutionProvider: "cpu", CUDAExecutionProvider: "cuda" };

function int64(values, dims) {
  return new ort.Tensor("int64", BigInt64Array.from(values, (v) => BigInt(v)), dims);
}

function zeros(type, dims) {
  const size = dims.reduce((a, b) => a * b, 1);
  const data = type === "float32" ? new Float32Array(size) : new Uint16Array(size);  // float16 / bfloat16: raw bits
  return new ort.Tensor(type, data, dims);
}

function halfToFloat(h) {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * 2 ** -14 * (frac / 1024);
  if (exp === 31) return frac ? NaN : sign * Infinity;
  return sign * 2 ** (exp - 15) * (1 + frac / 1024);
}

/** Values [start, start + length) of a float tensor as numbers (float32, float16, bfloat16). */
function floatsAt(tensor, start, length) {
  const raw = tensor.data.subarray(start, start + length);
  if (tensor.type === "float32" || tensor.type === "float64") return raw;
  if (tensor.type === "float16") return Float32Array.from(raw, (h) => (typeof h === "number" ? halfToFloat(h) : h));
  if (tensor.type === "bfloat16") return Float32Array.from(raw, (b) => new Float32Array(new Uint32Array([b << 16]).buffer)[0]);
  throw new KilnError(`unsupported output type ${tensor.type}`);
}

/** First index of the largest value (numpy argmax's tie rule). */
export function argmax(values) {
  let best = 0;
  for (let i = 1; i < values.length; i++) if (values[i] > values[best]) best = i;
  return best;
}

// --- KV-cache layout --------------------------------------------------------------------

/** Expand a cache name template ("past_key_values.{layer}.{key|value}", text after ': ' is
 *  commentary) into [[key, value] names per layer]. */
export function cacheNames(template, numLayers) {
  const pattern = template.split(": ")[0].trim();
  return Array.from({ length: numLayers }, (_, layer) =>
    ["key", "value"].map((kind) => pattern.replaceAll("{layer}", String(layer)).replaceAll("{key|value}", kind)));
}

class CacheLayout {
  constructor(kv, io, where) {
    this.numLayers = kv.num_layers;
    this.kvHeads = kv.kv_heads;
    this.headDims = [kv.head_dim, kv.value_head_dim];
    this.sequenceAxis = kv.sequence_axis;
    this.type = ORT_TYPES[kv.dtype];
    this.static = kv.static === true;
    this.maxLength = this.static ? kv.max_length : null;
    this.maxPositions = kv.max_positions ?? null;
    this.past = cacheNames(kv.past, this.numLayers);
    this.present = cacheNames(kv.present, this.numLayers);
    const inputs = new Set(io.inputs.map((t) => t.name));
    const outputs = new Set(io.outputs.map((t) => t.name));
    const need = [["input_ids", inputs], ["attention_mask", inputs], ["position_ids", inputs], ["logits", outputs],
      ...(this.static ? [["cache_position", inputs]] : []),
      ...this.past.flat().map((n) => [n, inputs]), ...this.present.flat().map((n) => [n, outputs])];
    for (const [name, set] of need) {
      if (!set.has(name)) throw new KilnError(`${where}: kv_cache names '${name}' but io does not list it`);
    }
    if (this.sequenceAxis !== 2) throw new KilnError(`${where}: kv_cache.sequence_axis ${this.sequenceAxis} is not supported`);
  }

  /** An empty cache for one sequence: length 0 on the growth axis (dynamic) or max_length zeroed slots (static). */
  empty() {
    const length = this.static ? this.maxLength : 0;
    return this.past.map(() => this.headDims.map((d) => zeros(this.type, [1, this.kvHeads, length, d])));
  }
}

// --- tokenizer ------------------------------------------------------------------------

/** The artifact's tokenizer.json (manifest `tokenizer`), or null when it has none. */
export function loadTokenizer(dir, manifest) {
  if (!manifest.tokenizer) return null;
  let json;
  try {
    json = JSON.parse(fs.readFileSync(artifactPath(dir, manifest.tokenizer, "tokenizer"), "utf8"));
  } catch (err) {
    throw new KilnError(`${dir}: cannot read the tokenizer ${manifest.tokenizer}: ${err.message}`);
  }
  // kiln decodes with the `tokenizers` library, which does no clean-up of spaces.
  return new Tokenizer(json, { clean_up_tokenization_spaces: false });
}

/** Token ids (and type ids) of `text` for an encoder, as kiln's `tokenize_batch` makes them:
 *  special tokens added by tokenizer.json's post-processor, truncated to `maxLen` from the
 *  right with the special tokens kept (the `tokenizers` library's truncation), no padding. */
export function encodeTruncated(tok, text, maxLen) {
  const whole = tok.encode(text, { return_token_type_ids: true });
  if (whole.ids.length <= maxLen) return { ids: whole.ids, typeIds: whole.token_type_ids ?? whole.ids.map(() => 0) };
  const content = tok.tokenize(text, { add_special_tokens: false });
  const specials = whole.ids.length - content.length;
  const kept = content.slice(0, Math.max(0, maxLen - specials));
  const processed = tok.post_processor ? tok.post_processor(kept, null, true) : { tokens: kept };
  const ids = processed.tokens.map((t) => tok.token_to_id(t) ?? tok.model.unk_token_id);
  return { ids, typeIds: processed.token_type_ids ?? ids.map(() => 0) };
}

/** The longest input an encoder artifact takes (manifest `embedding.max_sequence_length`, else 512). */
export function encoderLimit(manifest) {
  return manifest.embedding?.max_sequence_length || 512;
}

// --- artifact ---------------------------------------------------------------------------

export class Artifact {
  /** Open the artifact directory `dir` (validates kiln.json, creates the session, loads the tokenizer). */
  static async load(dir, { threads } = {}) {
    const manifest = readManifest(dir);
    const where = path.join(dir, MANIFEST);
    checkArtifactFiles(dir, manifest);
    const backend = manifest.backend;
    if (backend.name !== "ort") throw new KilnError(`${where}: backend '${backend.name}' is not supported (only ort)`);
    const settings = backend.session;
    const providers = settings.providers.map((p) => {
      if (!(p in PROVIDERS)) throw new KilnError(`${where}: execution provider ${p} is not supported here`);
      return PROVIDERS[p];
    });
    const options = {
      executionProviders: providers,
      graphOptimizationLevel: LEVELS[settings.graph_optimization_level ?? "all"],
      // the compiling machine's count, capped at this host's cores (a manifest must not size a pool)
      intraOpNumThreads: threads ?? Math.min(settings.intra_op_num_threads ?? 0, os.availableParallelism()),
      logSeverityLevel: 3,
    };
    let session;
    try {
      session = await ort.InferenceSession.create(artifactPath(dir, backend.model, "backend.model"), options);
    } catch (err) {
      throw new KilnError(`${dir}: cannot open the model: ${String(err.message ?? err).trim().split("\n")[0]}`);
    }
    return new Artifact(dir, manifest, session, loadTokenizer(dir, manifest));
  }

  constructor(dir, manifest, session, tokenizer) {
    this.path = dir;
    this.manifest = manifest;
    this.session = session;
    this.tokenizer = tokenizer;
    this.task = manifest.task;
    const where = path.join(dir, MANIFEST);
    this.kv = manifest.kv_cache ? new CacheLayout(manifest.kv_cache, manifest.io, where) : null;
    this.inputNames = manifest.io.inputs.map((t) => t.name);
    this.outputNames = manifest.io.outputs.map((t) => t.name);
  }

  needTokenizer() {
    if (!this.tokenizer) throw new KilnError(`${this.path}: the artifact has no tokenizer; pass token ids instead`);
    return this.tokenizer;
  }

  /** Token ids of `text`, special tokens added as tokenizer.json's post-processor says (as kiln does). */
  encode(text) {
    return this.needTokenizer().encode(text).ids;
  }

  /** Text of `ids`, special tokens skipped (as kiln does). */
  decode(ids) {
    return ids.length ? this.needTokenizer().decode(ids, { skip_special_tokens: true }) : "";
  }

  // --- causal LM ------------------------------------------------------------------------

  /** Greedy continuation of `prompt` (text or token ids), streaming each token to `onToken`.
   *  With `speculative: "lookup"`, up to `draftTokens` tokens that followed an earlier occurrence of
   *  the last 3 (then 2) tokens of the prompt and text so far are checked in the same forward as
   *  the next token; the tokens are the same as without (docs/speculative.md), `speculation`
   *  counts the drafts proposed and accepted and the target forwards. */
  async generate(prompt, { maxNewTokens, onToken, stopTokenIds, speculative, draftTokens = 8 } = {}) {
    if (this.task !== "causal-lm") throw new KilnError(`${this.path}: a ${this.task} artifact does not generate text`);
    const promptIds = typeof prompt === "string" ? this.encode(prompt) : [...prompt];
    if (!promptIds.length) throw new KilnError("the prompt is empty");
    const lookup = speculative === undefined ? null : await this.promptLookup(speculative);
    const gen = this.manifest.generation;
    const limit = maxNewTokens ?? gen.max_new_tokens ?? 64;
    const stops = new Set(stopTokenIds ?? gen.eos_token_ids);
    const tokens = [];
    const stats = { proposed: 0, accepted: 0, target_forwards: 0 };
    const emit = (token) => {  // whether generation ends with `token`
      tokens.push(token);
      if (onToken) onToken(token);
      return stops.has(token) || tokens.length >= limit;
    };
    let step = this.kv ? await this.prefill(promptIds) : await this.recompute(promptIds);
    for (;;) {
      const token = argmax(step.logits);
      if (emit(token)) break;
      if (!lookup) {
        step = this.kv ? await this.decodeStep(step, token) : await this.recompute([...promptIds, ...tokens]);
        continue;
      }
      const sequence = [...promptIds, ...tokens];
      // the last draft's position, sequence.length - 1 + k, stays below max_positions
      const room = this.kv.maxPositions === null ? Infinity : this.kv.maxPositions - sequence.length;
      const drafts = lookup.propose(sequence, Math.min(draftTokens, limit - tokens.length, room));
      step = await this.forward(step, [token, ...drafts], Array.from({ length: drafts.length + 1 }, (_, i) => step.used + i));
      let accepted = 0;
      while (accepted < drafts.length && argmax(logitsRow(step.all, accepted)) === drafts[accepted]) accepted++;
      Object.assign(stats, { proposed: stats.proposed + drafts.length, accepted: stats.accepted + accepted,
        target_forwards: stats.target_forwards + 1 });
      if (drafts.slice(0, accepted).some(emit)) break;
      if (accepted < drafts.length) {  // forget the rejected drafts' slots
        step.used -= drafts.length - accepted;
        step.cache = truncateCache(step.cache, step.used);
      }
      step.logits = logitsRow(step.all, accepted);
    }
    const text = this.tokenizer ? this.decode(tokens) : "";
    return { promptIds, tokenIds: tokens, text, stopReason: stops.has(tokens.at(-1)) ? "stop" : "length",
      ...(lookup ? { speculation: stats } : {}) };
  }

  /** The draft for `speculative` ("lookup" only), refused in one line where the cache cannot take
   *  it or where a step of several tokens computes other logits than one-token steps (int4
   *  MatMulNBits with int8 activations: then the tokens could differ; kiln.runtime.speculative). */
  async promptLookup(speculative) {
    if (speculative !== "lookup") throw new KilnError(`unknown draft '${speculative}': this runtime drafts by "lookup" only`);
    if (!this.kv || this.kv.static) {
      throw new KilnError(`${this.path}: speculative decoding needs a growing KV cache (manifest kv_cache, not static)`);
    }
    const state = await this.prefill([1]);
    const alone = (await this.forward(state, [2], [1])).logits;
    const first = logitsRow((await this.forward(state, [2, 3], [1, 2])).all, 0);
    let difference = 0;
    let largest = 1e-30;
    alone.forEach((v, i) => {
      difference = Math.max(difference, Math.abs(v - first[i]));
      largest = Math.max(largest, Math.abs(v));
    });
    if (difference / largest > 1e-4) {
      throw new KilnError(`${this.path}: the artifact computes a step of several tokens differently from one-token steps `
        + `(logits ${(difference / largest).toExponential(1)} apart, relative), so speculation could change its tokens: refused`);
    }
    return new PromptLookup(3, 2);
  }

  /** No cache: the whole sequence every step. */
  async recompute(ids) {
    const out = await this.session.run({ input_ids: int64(ids, [1, ids.length]) }, ["logits"]);
    return { logits: lastRow(out.logits) };
  }

  /** Prompt through an empty cache: mask all ones, positions 0..P-1. */
  async prefill(ids) {
    const state = { cache: this.kv.empty(), used: 0 };
    return this.forward(state, ids, Array.from(ids, (_, i) => i));
  }

  /** One token at the next position, the mask grown by one slot. */
  async decodeStep(state, token) {
    return this.forward(state, [token], [state.used]);
  }

  /** Feeds for `ids` at `positions` after `state.used` filled slots, as the layout says. */
  async forward(state, ids, positions) {
    const kv = this.kv;
    const used = state.used + ids.length;  // slots filled once these tokens are written
    if (kv.maxPositions !== null && Math.max(...positions) >= kv.maxPositions) {
      throw new KilnError(`position ${Math.max(...positions)} is past the model's rotary cache (${kv.maxPositions} positions)`);
    }
    const feeds = { input_ids: int64(ids, [1, ids.length]), position_ids: int64(positions, [1, positions.length]) };
    if (kv.static) {
      if (used > kv.maxLength) throw new KilnError(`the sequence (${used} tokens) exceeds the static cache length ${kv.maxLength}`);
      // [1, max_length]: 1 for every filled slot including the new tokens; the new tokens go to slots used-S..used-1.
      feeds.attention_mask = int64(Array.from({ length: kv.maxLength }, (_, i) => (i < used ? 1 : 0)), [1, kv.maxLength]);
      feeds.cache_position = int64(Array.from(ids, (_, i) => state.used + i), [ids.length]);
    } else {
      // [1, past + sequence]: one real token per slot (no padding for a single sequence).
      feeds.attention_mask = int64(new Array(used).fill(1), [1, used]);
    }
    kv.past.forEach(([k, v], layer) => {
      feeds[k] = state.cache[layer][0];
      feeds[v] = state.cache[layer][1];
    });
    const missing = this.inputNames.filter((n) => !(n in feeds));
    if (missing.length) throw new KilnError(`${this.path}: the model takes inputs this runtime cannot fill: ${missing.join(", ")}`);
    const out = await this.session.run(feeds, ["logits", ...kv.present.flat()]);
    const cache = kv.present.map(([k, v]) => [out[k], out[v]]);
    return { logits: lastRow(out.logits), all: out.logits, cache, used };
  }

  // --- embeddings -----------------------------------------------------------------------

  /** Encoder feeds: each text tokenized (special tokens added, truncated to
   *  embedding.max_sequence_length), padded with zeros to the longest in the batch. */
  tokenizeBatch(texts) {
    const tok = this.needTokenizer();
    if (!texts.length) throw new KilnError("no text to embed");
    const maxLen = encoderLimit(this.manifest);
    const encodings = texts.map((t) => encodeTruncated(tok, t, maxLen));
    const length = Math.max(...encodings.map((e) => e.ids.length));
    const rows = texts.length;
    const buffers = { input_ids: new BigInt64Array(rows * length), attention_mask: new BigInt64Array(rows * length),
      token_type_ids: new BigInt64Array(rows * length) };
    encodings.forEach((e, row) => {
      e.ids.forEach((id, j) => {
        buffers.input_ids[row * length + j] = BigInt(id);
        buffers.attention_mask[row * length + j] = 1n;
        buffers.token_type_ids[row * length + j] = BigInt(e.typeIds[j]);
      });
    });
    const feeds = {};
    for (const name of this.inputNames) {
      if (!(name in buffers)) throw new KilnError(`${this.path}: the encoder takes an input this runtime cannot fill: ${name}`);
      feeds[name] = new ort.Tensor("int64", buffers[name], [rows, length]);
    }
    return feeds;
  }

  /** One vector per text (the graph pools and normalizes as `embedding` says). */
  async embed(texts) {
    if (this.task !== "embedding") throw new KilnError(`${this.path}: a ${this.task} artifact does not produce embeddings`);
    if (!this.outputNames.includes("embedding")) throw new KilnError(`${this.path}: io lists no 'embedding' output`);
    const out = await this.session.run(this.tokenizeBatch(texts), ["embedding"]);
    const tensor = out.embedding;
    const dim = tensor.dims.at(-1);
    return texts.map((_, row) => Float32Array.from(floatsAt(tensor, row * dim, dim)));
  }
}

function lastRow(logits) {
  return logitsRow(logits, logits.dims[1] - 1);
}

/** The logits [vocab] at new position `i` of a [1, S, vocab] output. */
function logitsRow(logits, i) {
  const vocab = logits.dims[2];
  return floatsAt(logits, i * vocab, vocab);
}

/** A [1, heads, L, dim] cache cut back to its first `length` slots on the sequence axis. */
function truncateCache(cache, length) {
  return cache.map((pair) => pair.map((tensor) => {
    const [, heads, slots, dim] = tensor.dims;
    const data = new tensor.data.constructor(heads * length * dim);
    for (let h = 0; h < heads; h++) data.set(tensor.data.subarray(h * slots * dim, (h * slots + length) * dim), h * length * dim);
    return new ort.Tensor(tensor.type, data, [1, heads, length, dim]);
  }));
}

/** Prompt lookup: the tokens that followed the latest earlier occurrence of the sequence's last
 *  n tokens, n from `ngram` down to `minNgram` (kiln.runtime.speculative.PromptLookup). */
class PromptLookup {
  constructor(ngram, minNgram) {
    this.sizes = Array.from({ length: ngram - minNgram + 1 }, (_, i) => ngram - i);
    this.index = new Map();  // n-gram (joined) -> where its continuation starts
    this.indexed = 0;  // n-grams ending before this position are indexed
  }

  propose(tokens, k) {
    if (k <= 0) return [];
    for (let end = this.indexed; end < tokens.length - 1; end++) {
      for (const n of this.sizes) if (end + 1 >= n) this.index.set(tokens.slice(end + 1 - n, end + 1).join(","), end + 1);
    }
    this.indexed = Math.max(this.indexed, tokens.length - 1);
    for (const n of this.sizes) {
      const start = tokens.length >= n ? this.index.get(tokens.slice(-n).join(",")) : undefined;
      if (start !== undefined) return tokens.slice(start, start + k);
    }
    return [];
  }
}

export async function load(dir, options) {
  return Artifact.load(dir, options);
}
