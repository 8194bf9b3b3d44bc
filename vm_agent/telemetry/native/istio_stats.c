/* vm-agent's native stand-in for istio-proxy's stats filter, loaded by stock Envoy as a dynamic module.
 *
 * The stock-filter path (vm_agent/telemetry/filters.py) makes Envoy's stats access logger format every fact of
 * every stat's tag anew: about 11 formatter commands x 3 histograms per request and side. This filter reads each
 * fact once, when the stream completes, joins them into the same raw tag (version 3, filters._raw) and counts the
 * three histograms under it, so the agent's /stats/prometheus rendering (telemetry/metrics.py) is unchanged.
 *
 * Per side (filter_config, a string):
 *   "destination": first in an inbound HCM; copies the caller's x-envoy-peer-metadata header before the router
 *                  removes it.
 *   "source":      first in an outbound HCM; takes the peer's x-envoy-peer-metadata answer off the response
 *                  (instead of header_to_metadata) and keeps it for the tag.
 * Facts left empty are empty fields, as the stock path prints them.
 *
 * The histograms are kept here, not in Envoy's stats: an Envoy stat with a dynamic label costs a name lookup per
 * value recorded (three per request: three quarters of this filter's work when it used them). Each worker thread counts into its
 * own table (its lock is uncontended but for the exporter's brief visits); an exporter thread writes the sum of
 * all tables once a second, when something changed, to the file named in the configuration, in the Prometheus text
 * Envoy would print for the same histograms (Envoy's default buckets). The agent serves it with Envoy's own text. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "envoy_abi.h"

#define EXPORT __attribute__((visibility("default")))
#define SEP '\x1f'

static const char PEER_HEADER[] = "x-envoy-peer-metadata";
static const char CONTENT_TYPE[] = "content-type";

enum { DURATION, REQUEST_BYTES, RESPONSE_BYTES, N_HISTOGRAMS };
static const char* const HISTOGRAMS[N_HISTOGRAMS] = {
    "istio_request_duration_milliseconds", "istio_request_bytes", "istio_response_bytes"};

struct config {
  int inbound;
};

struct stream {
  const struct config* config;
  uint64_t start_ns;
  char* peer; /* the peer's metadata header (inbound: the caller's; outbound: the answer), owned */
  size_t peer_len;
};

/* Envoy's response flags in bit order, as %RESPONSE_FLAGS% prints them. */
static const char* const FLAGS[] = {"LH",  "UH",  "UT",    "LR",   "UR",   "UF",  "UC",  "UO",  "NR", "DI",
                                    "FI",  "RL",  "UAEX",  "RLSE", "DC",   "URX", "SI",  "IH",  "DPE", "UMSDR",
                                    "RFCF", "NFCF", "DT",  "UPE",  "NC",   "OM",  "DF",  "DO",  "DR",  "UDO"};

static envoy_buffer lit(const char* s) { return (envoy_buffer){s, strlen(s)}; }

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

EXPORT const char* envoy_dynamic_module_on_program_init(void) { return "v0.2.0"; }

static void start_exporter(const char* path, size_t len);

/* filter_config: "<reporter>|<file the histograms are written to>". */
EXPORT const void* envoy_dynamic_module_on_http_filter_config_new(envoy_filter_config envoy_config,
                                                                 envoy_buffer name, envoy_buffer text) {
  (void)name, (void)envoy_config;
  const char* bar = text.ptr ? memchr(text.ptr, '|', text.length) : NULL;
  if (bar == NULL || bar == text.ptr + text.length - 1) return NULL; /* Envoy rejects the configuration */
  size_t reporter_len = (size_t)(bar - text.ptr);
  struct config* c = calloc(1, sizeof *c);
  if (c == NULL) return NULL;
  if (reporter_len == 11 && memcmp(text.ptr, "destination", 11) == 0) {
    c->inbound = 1;
  } else if (!(reporter_len == 6 && memcmp(text.ptr, "source", 6) == 0)) {
    free(c); /* a reporter must be named */
    return NULL;
  }
  start_exporter(bar + 1, text.length - reporter_len - 1);
  return c;
}

EXPORT void envoy_dynamic_module_on_http_filter_config_destroy(const void* config) { free((void*)config); }

EXPORT const void* envoy_dynamic_module_on_http_filter_new(const void* config, envoy_filter filter) {
  (void)filter;
  struct stream* s = calloc(1, sizeof *s);
  if (s == NULL) return NULL;
  s->config = config;
  s->start_ns = now_ns();
  return s;
}

EXPORT void envoy_dynamic_module_on_http_filter_destroy(const void* stream) {
  struct stream* s = (struct stream*)stream;
  free(s->peer);
  free(s);
}

static void keep_peer(envoy_filter filter, struct stream* s, int map) {
  envoy_buffer value = {NULL, 0};
  if (!envoy_dynamic_module_callback_http_get_header(filter, map, lit(PEER_HEADER), &value, 0, NULL) ||
      value.ptr == NULL || value.length == 0)
    return;
  char* copy = malloc(value.length);
  if (copy == NULL) return;
  memcpy(copy, value.ptr, value.length);
  free(s->peer);
  s->peer = copy;
  s->peer_len = value.length;
}

EXPORT int envoy_dynamic_module_on_http_filter_request_headers(envoy_filter filter, const void* stream,
                                                              bool end_of_stream) {
  (void)end_of_stream;
  struct stream* s = (struct stream*)stream;
  /* The router removes the caller's header (route request_headers_to_remove) before the stream ends. */
  if (s->config->inbound) keep_peer(filter, s, ENVOY_REQUEST_HEADERS);
  return 0; /* Continue */
}

EXPORT int envoy_dynamic_module_on_http_filter_response_headers(envoy_filter filter, const void* stream,
                                                               bool end_of_stream) {
  (void)end_of_stream;
  struct stream* s = (struct stream*)stream;
  if (!s->config->inbound) {
    keep_peer(filter, s, ENVOY_RESPONSE_HEADERS);
    /* The application never sees the exchange. */
    envoy_dynamic_module_callback_http_set_header(filter, ENVOY_RESPONSE_HEADERS, lit(PEER_HEADER),
                                                  (envoy_buffer){NULL, 0});
  }
  return 0;
}

/* A growing tag: facts are appended with their separator. */
struct tag {
  char* buf;
  size_t len, cap;
  int failed, on_heap;
};

static void put(struct tag* t, const char* p, size_t n, int sep) {
  if (t->failed) return;
  size_t need = t->len + n + 1;
  if (need > t->cap) {
    size_t cap = t->cap * 2 > need ? t->cap * 2 : need;
    char* grown = t->on_heap ? realloc(t->buf, cap) : malloc(cap);
    if (grown == NULL) {
      t->failed = 1;
      return;
    }
    if (!t->on_heap) memcpy(grown, t->buf, t->len);
    t->on_heap = 1;
    t->buf = grown;
    t->cap = cap;
  }
  if (n) memcpy(t->buf + t->len, p, n);
  t->len += n;
  if (sep) t->buf[t->len++] = SEP;
}

static void put_str(struct tag* t, envoy_filter f, int attribute) {
  envoy_buffer v = {NULL, 0};
  if (envoy_dynamic_module_callback_http_filter_get_attribute_string(f, attribute, &v) && v.ptr != NULL)
    put(t, v.ptr, v.length, 1);
  else
    put(t, NULL, 0, 1);
}

/* Decimal digits of v (snprintf costs several times more per call). */
static void put_uint(struct tag* t, uint64_t v) {
  char digits[20];
  size_t n = 0;
  do {
    digits[sizeof digits - 1 - n++] = (char)('0' + v % 10);
    v /= 10;
  } while (v);
  put(t, digits + sizeof digits - n, n, 1);
}

static uint64_t get_int(envoy_filter f, int attribute, int* ok) {
  uint64_t v = 0;
  *ok = envoy_dynamic_module_callback_http_filter_get_attribute_int(f, attribute, &v);
  return v;
}

static void put_flags(struct tag* t, uint64_t flags) {
  if (flags == 0) {
    put(t, "-", 1, 1);
    return;
  }
  int first = 1;
  for (size_t i = 0; i < sizeof FLAGS / sizeof FLAGS[0]; i++) {
    if (!(flags & ((uint64_t)1 << i))) continue;
    if (!first) put(t, ",", 1, 0);
    put(t, FLAGS[i], strlen(FLAGS[i]), 0);
    first = 0;
  }
  put(t, NULL, 0, 1);
}

/* ---- the histograms: per-thread tables, summed by the exporter ---- */

/* Envoy's default histogram buckets (Istio's too). */
static const uint64_t BOUNDS_X2[] = {1, 2, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000,
                                      60000, 120000, 600000, 1200000, 3600000, 7200000}; /* 2 x the bound */
static const char* const BOUND_TEXT[] = {"0.5",  "1",    "5",     "10",     "25",     "50",     "100",
                                         "250",  "500",  "1000",  "2500",   "5000",   "10000",  "30000",
                                         "60000", "300000", "600000", "1800000", "3600000"};
#define N_BOUNDS (sizeof BOUNDS_X2 / sizeof BOUNDS_X2[0])

struct series {
  uint64_t hash;
  char* key;
  size_t key_len;
  uint64_t buckets[N_HISTOGRAMS][N_BOUNDS]; /* per bucket, not cumulative */
  uint64_t sum[N_HISTOGRAMS], count[N_HISTOGRAMS];
};

struct table {
  pthread_mutex_t lock;
  struct series* slots; /* open addressing; key == NULL is free */
  size_t cap, used;
  uint64_t records; /* requests counted here: the exporter skips a second in which none was */
  struct table* next;
};

static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static struct table* tables;    /* every thread's table, under registry_lock */
static char* export_path;       /* set once, by the first configuration */
static _Thread_local struct table* mine;

static uint64_t hash_bytes(const char* p, size_t n) {
  uint64_t h = 0x9e3779b97f4a7c15u ^ n;
  while (n >= 8) {
    uint64_t w;
    memcpy(&w, p, 8);
    h = (h ^ w) * 0xff51afd7ed558ccdu;
    h ^= h >> 32;
    p += 8;
    n -= 8;
  }
  uint64_t w = 0;
  memcpy(&w, p, n);
  h = (h ^ w) * 0xc4ceb9fe1a85ec53u;
  return h ^ (h >> 29);
}

/* The slot for key in t (inserted when missing); NULL only when memory runs out. */
static struct series* slot_of(struct table* t, uint64_t h, const char* key, size_t len) {
  if ((t->used + 1) * 4 > t->cap * 3) {
    size_t cap = t->cap ? t->cap * 2 : 64;
    struct series* grown = calloc(cap, sizeof *grown);
    if (grown == NULL) return NULL;
    for (size_t i = 0; i < t->cap; i++) {
      if (t->slots[i].key == NULL) continue;
      size_t j = t->slots[i].hash & (cap - 1);
      while (grown[j].key != NULL) j = (j + 1) & (cap - 1);
      grown[j] = t->slots[i];
    }
    free(t->slots);
    t->slots = grown;
    t->cap = cap;
  }
  size_t i = h & (t->cap - 1);
  while (t->slots[i].key != NULL) {
    struct series* e = &t->slots[i];
    if (e->hash == h && e->key_len == len && memcmp(e->key, key, len) == 0) return e;
    i = (i + 1) & (t->cap - 1);
  }
  char* copy = malloc(len ? len : 1);
  if (copy == NULL) return NULL;
  memcpy(copy, key, len);
  struct series* e = &t->slots[i];
  e->hash = h;
  e->key = copy;
  e->key_len = len;
  t->used++;
  return e;
}

static struct table* my_table(void) {
  if (mine != NULL) return mine;
  struct table* t = calloc(1, sizeof *t);
  if (t == NULL) return NULL;
  pthread_mutex_init(&t->lock, NULL);
  pthread_mutex_lock(&registry_lock);
  t->next = tables;
  tables = t;
  pthread_mutex_unlock(&registry_lock);
  mine = t;
  return t;
}

static void record(const char* key, size_t len, const uint64_t values[N_HISTOGRAMS]) {
  struct table* t = my_table();
  if (t == NULL) return;
  uint64_t h = hash_bytes(key, len);
  pthread_mutex_lock(&t->lock);
  struct series* e = slot_of(t, h, key, len);
  if (e != NULL) {
    for (int m = 0; m < N_HISTOGRAMS; m++) {
      size_t b = 0;
      while (b < N_BOUNDS && values[m] * 2 > BOUNDS_X2[b]) b++;
      if (b < N_BOUNDS) e->buckets[m][b]++;
      e->sum[m] += values[m];
      e->count[m]++;
    }
  }
  t->records++;
  pthread_mutex_unlock(&t->lock);
}

/* Requests counted so far by every thread (each table's lock held only to read its counter). */
static uint64_t records(void) {
  uint64_t n = 0;
  pthread_mutex_lock(&registry_lock);
  for (struct table* t = tables; t != NULL; t = t->next) {
    pthread_mutex_lock(&t->lock);
    n += t->records;
    pthread_mutex_unlock(&t->lock);
  }
  pthread_mutex_unlock(&registry_lock);
  return n;
}

/* Prometheus label value: backslash, double quote and newline escaped (runs between them written whole). */
static void write_label(FILE* f, const char* p, size_t n) {
  size_t start = 0;
  for (size_t i = 0; i < n; i++) {
    char c = p[i];
    if (c != '\\' && c != '"' && c != '\n') continue;
    fwrite(p + start, 1, i - start, f);
    fputs(c == '\n' ? "\\n" : c == '"' ? "\\\"" : "\\\\", f);
    start = i + 1;
  }
  fwrite(p + start, 1, n - start, f);
}

/* Writes the sum of every table to export_path (through a temporary file and a rename). */
static void export_once(void) {
  struct table merged = {0};
  pthread_mutex_lock(&registry_lock);
  for (struct table* t = tables; t != NULL; t = t->next) {
    pthread_mutex_lock(&t->lock);
    for (size_t i = 0; i < t->cap; i++) {
      struct series* e = &t->slots[i];
      if (e->key == NULL) continue;
      struct series* m = slot_of(&merged, e->hash, e->key, e->key_len);
      if (m == NULL) continue;
      for (int h = 0; h < N_HISTOGRAMS; h++) {
        for (size_t b = 0; b < N_BOUNDS; b++) m->buckets[h][b] += e->buckets[h][b];
        m->sum[h] += e->sum[h];
        m->count[h] += e->count[h];
      }
    }
    pthread_mutex_unlock(&t->lock);
  }
  pthread_mutex_unlock(&registry_lock);

  size_t plen = strlen(export_path);
  char* tmp = malloc(plen + 5);
  if (tmp != NULL) {
    memcpy(tmp, export_path, plen);
    memcpy(tmp + plen, ".tmp", 5);
    FILE* f = fopen(tmp, "w");
    if (f != NULL) {
      for (int h = 0; h < N_HISTOGRAMS; h++) {
        fprintf(f, "# TYPE envoy_istiocustom_%s histogram\n", HISTOGRAMS[h]);
        for (size_t i = 0; i < merged.cap; i++) {
          struct series* e = &merged.slots[i];
          if (e->key == NULL) continue;
          uint64_t cumulative = 0;
          for (size_t b = 0; b <= N_BOUNDS; b++) {
            if (b < N_BOUNDS) cumulative += e->buckets[h][b];
            fprintf(f, "envoy_istiocustom_%s_bucket{raw=\"", HISTOGRAMS[h]);
            write_label(f, e->key, e->key_len);
            fprintf(f, "\",le=\"%s\"} %llu\n", b < N_BOUNDS ? BOUND_TEXT[b] : "+Inf",
                    (unsigned long long)(b < N_BOUNDS ? cumulative : e->count[h]));
          }
          fprintf(f, "envoy_istiocustom_%s_sum{raw=\"", HISTOGRAMS[h]);
          write_label(f, e->key, e->key_len);
          fprintf(f, "\"} %llu\n", (unsigned long long)e->sum[h]);
          fprintf(f, "envoy_istiocustom_%s_count{raw=\"", HISTOGRAMS[h]);
          write_label(f, e->key, e->key_len);
          fprintf(f, "\"} %llu\n", (unsigned long long)e->count[h]);
        }
      }
      if (fclose(f) == 0) rename(tmp, export_path);
    }
    free(tmp);
  }
  for (size_t i = 0; i < merged.cap; i++) free(merged.slots[i].key);
  free(merged.slots);
}

static void* exporter(void* unused) {
  (void)unused;
  uint64_t written = (uint64_t)-1; /* the first pass always writes: a file left by an earlier Envoy goes */
  for (;;) {
    uint64_t now = records();
    if (now != written) {
      export_once();
      written = now;
    }
    sleep(1);
  }
  return NULL;
}

static void start_exporter(const char* path, size_t len) {
  pthread_mutex_lock(&registry_lock);
  if (export_path == NULL) {
    char* copy = malloc(len + 1);
    if (copy != NULL) {
      memcpy(copy, path, len);
      copy[len] = 0;
      export_path = copy;
      pthread_t thread;
      pthread_attr_t attr;
      pthread_attr_init(&attr);
      pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
      pthread_create(&thread, &attr, exporter, NULL);
      pthread_attr_destroy(&attr);
    }
  }
  pthread_mutex_unlock(&registry_lock);
}

EXPORT void envoy_dynamic_module_on_http_filter_stream_complete(envoy_filter f, const void* stream) {
  const struct stream* s = stream;
  int inbound = s->config->inbound, ok;
  char stack[1024];
  struct tag t = {stack, 0, sizeof stack, 0, 0};
  uint64_t duration_ms = (now_ns() - s->start_ns) / 1000000u;

  put(&t, "3", 1, 1);
  const char* reporter = inbound ? "destination" : "source";
  put(&t, reporter, strlen(reporter), 1);
  put(&t, "http", 4, 1);
  uint64_t code = get_int(f, ENVOY_ATTR_RESPONSE_CODE, &ok);
  put_uint(&t, ok ? code : 0);
  uint64_t grpc = get_int(f, ENVOY_ATTR_RESPONSE_GRPC_STATUS, &ok);
  if (ok)
    put_uint(&t, grpc);
  else
    put(&t, NULL, 0, 1);
  put_flags(&t, get_int(f, ENVOY_ATTR_RESPONSE_FLAGS, &ok));
  put_str(&t, f, ENVOY_ATTR_CLUSTER_NAME);
  envoy_buffer endpoint = {NULL, 0};
  if (!inbound)
    envoy_dynamic_module_callback_http_get_metadata_string(f, ENVOY_METADATA_HOST, lit("istio"), lit("workload"),
                                                           &endpoint);
  put(&t, endpoint.ptr, endpoint.ptr ? endpoint.length : 0, 1);
  put(&t, NULL, 0, 1); /* our own SAN: the agent fills it in */
  put(&t, NULL, 0, 1); /* the cluster's services: looked up by the agent */
  put_str(&t, f, inbound ? ENVOY_ATTR_DOWNSTREAM_PEER_URI_SAN : ENVOY_ATTR_UPSTREAM_PEER_URI_SAN);
  if (inbound) {
    put(&t, NULL, 0, 1); /* route and Host fallback are outbound facts */
    put(&t, NULL, 0, 1);
  } else {
    put_str(&t, f, ENVOY_ATTR_ROUTE_NAME);
    put_str(&t, f, ENVOY_ATTR_REQUEST_HOST);
  }
  envoy_buffer ct = {NULL, 0};
  envoy_dynamic_module_callback_http_get_header(f, ENVOY_REQUEST_HEADERS, lit(CONTENT_TYPE), &ct, 0, NULL);
  put(&t, ct.ptr, ct.ptr ? ct.length : 0, 1);
  put(&t, s->peer, s->peer ? s->peer_len : 0, 0);

  if (!t.failed) {
    uint64_t values[N_HISTOGRAMS] = {duration_ms, get_int(f, ENVOY_ATTR_REQUEST_TOTAL_SIZE, &ok),
                                     get_int(f, ENVOY_ATTR_RESPONSE_TOTAL_SIZE, &ok)};
    record(t.buf, t.len, values);
  }
  if (t.on_heap) free(t.buf);
}

/* Hooks Envoy resolves for every HTTP filter module; this filter needs none of them. */
EXPORT int envoy_dynamic_module_on_http_filter_request_body(envoy_filter f, const void* s, bool end) {
  (void)f, (void)s, (void)end;
  return 0;
}
EXPORT int envoy_dynamic_module_on_http_filter_request_trailers(envoy_filter f, const void* s) {
  (void)f, (void)s;
  return 0;
}
EXPORT int envoy_dynamic_module_on_http_filter_response_body(envoy_filter f, const void* s, bool end) {
  (void)f, (void)s, (void)end;
  return 0;
}
EXPORT int envoy_dynamic_module_on_http_filter_response_trailers(envoy_filter f, const void* s) {
  (void)f, (void)s;
  return 0;
}
EXPORT int envoy_dynamic_module_on_http_filter_local_reply(envoy_filter f, const void* s, uint32_t code,
                                                           envoy_buffer details, bool reset) {
  (void)f, (void)s, (void)code, (void)details, (void)reset;
  return 0;
}
EXPORT const void* envoy_dynamic_module_on_http_filter_per_route_config_new(envoy_buffer name, envoy_buffer c) {
  (void)name, (void)c;
  return NULL;
}
EXPORT void envoy_dynamic_module_on_http_filter_per_route_config_destroy(const void* c) { (void)c; }
EXPORT void envoy_dynamic_module_on_http_filter_scheduled(envoy_filter f, const void* s, uint64_t id) {
  (void)f, (void)s, (void)id;
}
EXPORT void envoy_dynamic_module_on_http_filter_config_scheduled(envoy_filter_config c, const void* m, uint64_t id) {
  (void)c, (void)m, (void)id;
}
EXPORT void envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(envoy_filter f,
                                                                                            const void* s) {
  (void)f, (void)s;
}
EXPORT void envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(envoy_filter f,
                                                                                           const void* s) {
  (void)f, (void)s;
}
EXPORT void envoy_dynamic_module_on_http_filter_http_callout_done(void* f, const void* s, uint64_t id, int result,
                                                                  void* headers, size_t n_headers, void* body,
                                                                  size_t n_body) {
  (void)f, (void)s, (void)id, (void)result, (void)headers, (void)n_headers, (void)body, (void)n_body;
}
EXPORT void envoy_dynamic_module_on_http_filter_http_stream_headers(void* f, const void* s, uint64_t id, void* h,
                                                                    size_t n, bool end) {
  (void)f, (void)s, (void)id, (void)h, (void)n, (void)end;
}
EXPORT void envoy_dynamic_module_on_http_filter_http_stream_data(void* f, const void* s, uint64_t id, const void* d,
                                                                 size_t n, bool end) {
  (void)f, (void)s, (void)id, (void)d, (void)n, (void)end;
}
EXPORT void envoy_dynamic_module_on_http_filter_http_stream_trailers(void* f, const void* s, uint64_t id, void* t,
                                                                     size_t n) {
  (void)f, (void)s, (void)id, (void)t, (void)n;
}
EXPORT void envoy_dynamic_module_on_http_filter_http_stream_complete(void* f, const void* s, uint64_t id) {
  (void)f, (void)s, (void)id;
}
EXPORT void envoy_dynamic_module_on_http_filter_http_stream_reset(void* f, const void* s, uint64_t id, int reason) {
  (void)f, (void)s, (void)id, (void)reason;
}
EXPORT void envoy_dynamic_module_on_http_filter_config_http_callout_done(void* c, const void* m, uint64_t id,
                                                                         int result, void* headers, size_t n_headers,
                                                                         void* body, size_t n_body) {
  (void)c, (void)m, (void)id, (void)result, (void)headers, (void)n_headers, (void)body, (void)n_body;
}
EXPORT void envoy_dynamic_module_on_http_filter_config_http_stream_headers(void* c, const void* m, uint64_t id,
                                                                           void* h, size_t n, bool end) {
  (void)c, (void)m, (void)id, (void)h, (void)n, (void)end;
}
EXPORT void envoy_dynamic_module_on_http_filter_config_http_stream_data(void* c, const void* m, uint64_t id,
                                                                        const void* d, size_t n, bool end) {
  (void)c, (void)m, (void)id, (void)d, (void)n, (void)end;
}
EXPORT void envoy_dynamic_module_on_http_filter_config_http_stream_trailers(void* c, const void* m, uint64_t id,
                                                                            void* t, size_t n) {
  (void)c, (void)m, (void)id, (void)t, (void)n;
}
EXPORT void envoy_dynamic_module_on_http_filter_config_http_stream_complete(void* c, const void* m, uint64_t id) {
  (void)c, (void)m, (void)id;
}
EXPORT void envoy_dynamic_module_on_http_filter_config_http_stream_reset(void* c, const void* m, uint64_t id,
                                                                         int reason) {
  (void)c, (void)m, (void)id, (void)reason;
}
