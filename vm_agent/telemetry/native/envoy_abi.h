/* The part of Envoy's dynamic-module ABI this module uses, declared from Envoy's documented interface
 * (ABI v0.1.0 of April 2026; Envoy 1.40 ships v0.2.0, which keeps every v0.1.x declaration). Only these
 * names, argument lists and enum values are relied on; tests load the module into the shipped Envoy. */
#ifndef VM_AGENT_ENVOY_ABI_H
#define VM_AGENT_ENVOY_ABI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* A byte range owned by Envoy (valid until the current hook returns) or by the module. */
typedef struct {
  const char* ptr;
  size_t length;
} envoy_buffer;

typedef void* envoy_filter_config; /* Envoy's side of a filter configuration */
typedef void* envoy_filter;        /* Envoy's side of one stream's filter */

enum envoy_header_map { ENVOY_REQUEST_HEADERS = 0, ENVOY_RESPONSE_HEADERS = 2 };
enum envoy_metadata_source { ENVOY_METADATA_HOST = 3 };

/* Positions in Envoy's attribute list (its CEL attribute names in the comments). */
enum envoy_attribute {
  ENVOY_ATTR_REQUEST_HOST = 2,            /* request.host */
  ENVOY_ATTR_REQUEST_TOTAL_SIZE = 14,     /* request.total_size */
  ENVOY_ATTR_RESPONSE_CODE = 15,          /* response.code */
  ENVOY_ATTR_RESPONSE_FLAGS = 17,         /* response.flags */
  ENVOY_ATTR_RESPONSE_GRPC_STATUS = 18,   /* response.grpc_status */
  ENVOY_ATTR_RESPONSE_TOTAL_SIZE = 22,    /* response.total_size */
  ENVOY_ATTR_DOWNSTREAM_PEER_URI_SAN = 37,/* connection.uri_san_peer_certificate */
  ENVOY_ATTR_UPSTREAM_PEER_URI_SAN = 49,  /* upstream.uri_san_peer_certificate */
  ENVOY_ATTR_CLUSTER_NAME = 57,           /* xds.cluster_name */
  ENVOY_ATTR_ROUTE_NAME = 61,             /* xds.route_name */
};

/* Callbacks Envoy exports to modules. */
bool envoy_dynamic_module_callback_http_get_header(envoy_filter filter, int map, envoy_buffer key,
                                                   envoy_buffer* value, size_t index, size_t* count);
/* A null value pointer removes the header. */
bool envoy_dynamic_module_callback_http_set_header(envoy_filter filter, int map, envoy_buffer key,
                                                   envoy_buffer value);
bool envoy_dynamic_module_callback_http_filter_get_attribute_string(envoy_filter filter, int attribute,
                                                                    envoy_buffer* value);
bool envoy_dynamic_module_callback_http_filter_get_attribute_int(envoy_filter filter, int attribute,
                                                                 uint64_t* value);
bool envoy_dynamic_module_callback_http_get_metadata_string(envoy_filter filter, int source, envoy_buffer ns,
                                                            envoy_buffer key, envoy_buffer* value);

#endif
