/* vm-agent's native stand-in for istio-proxy's stats filter, loaded by stock Envoy as a dynamic module.
 *
 * The stock-filter path (vm_agent/telemetry/filters.py) makes Envoy's stats access logger format every fact of
 * every stat's tag anew: about 11 formatter commands x 3 histograms per request and side. This filter reads each
 * fact once, when the stream completes, joins them into the same raw tag (version 3, filters._raw) and records the
 * three histograms under it, so the agent's /stats/prometheus rendering (telemetry/metrics.py) is unchanged.
 *
 * Per side (filter_config, a string):
 *   "destination": first in an inbound HCM; copies the caller's x-envoy-peer-metadata header before the router
 *                  removes it.
 *   "source":      first in an outbound HCM; takes the peer's x-envoy-peer-metadata answer off the response
 *                  (instead of header_to_metadata) and keeps it for the tag.
 * Facts left empty are empty fields, as the stock path prints them. */
#include <stdlib.h>
#include <string.h>
#include <time.h>

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
  size_t ids[N_HISTOGRAMS];
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

EXPORT const void* envoy_dynamic_module_on_http_filter_config_new(envoy_filter_config envoy_config,
                                                                 envoy_buffer name, envoy_buffer text) {
  (void)name;
  struct config* c = calloc(1, sizeof *c);
  if (c == NULL) return NULL;
  if (text.length == 11 && memcmp(text.ptr, "destination", 11) == 0) {
    c->inbound = 1;
  } else if (!(text.length == 6 && memcmp(text.ptr, "source", 6) == 0)) {
    free(c); /* Envoy rejects the configuration: a reporter must be named */
    return NULL;
  }
  envoy_buffer label = lit("raw");
  for (int i = 0; i < N_HISTOGRAMS; i++) {
    if (envoy_dynamic_module_callback_http_filter_config_define_histogram(envoy_config, lit(HISTOGRAMS[i]), &label,
                                                                          1, &c->ids[i]) != ENVOY_METRICS_OK) {
      free(c);
      return NULL;
    }
  }
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
    envoy_buffer raw = {t.buf, t.len};
    uint64_t values[N_HISTOGRAMS] = {duration_ms, get_int(f, ENVOY_ATTR_REQUEST_TOTAL_SIZE, &ok),
                                     get_int(f, ENVOY_ATTR_RESPONSE_TOTAL_SIZE, &ok)};
    for (int i = 0; i < N_HISTOGRAMS; i++)
      envoy_dynamic_module_callback_http_filter_record_histogram_value(f, s->config->ids[i], &raw, 1, values[i]);
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
