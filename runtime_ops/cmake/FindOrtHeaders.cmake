# Locates ONNX Runtime's C/C++ API headers (onnxruntime_c_api.h, onnxruntime_cxx_api.h).
#
# Order: $ORT_INCLUDE_DIR (environment or cache variable), /usr/include/onnxruntime, then Debian
# trixie's libonnxruntime-dev fetched with `apt-get download` through a private apt configuration
# whose state lives in the build directory, and unpacked with `dpkg-deb -x` (never installed
# system-wide: the package drags in a newer glibc). No PyPI package ships these headers.
# Sets BCT_ORT_INCLUDE_DIR and BCT_ORT_HEADERS_SOURCE.

function(_bct_ort_dir_ok dir result)
  if(dir AND EXISTS "${dir}/onnxruntime_c_api.h" AND EXISTS "${dir}/onnxruntime_cxx_api.h")
    set(${result} TRUE PARENT_SCOPE)
  else()
    set(${result} FALSE PARENT_SCOPE)
  endif()
endfunction()

set(_bct_candidates "")
if(DEFINED ORT_INCLUDE_DIR)
  list(APPEND _bct_candidates "${ORT_INCLUDE_DIR}")
endif()
if(DEFINED ENV{ORT_INCLUDE_DIR})
  list(APPEND _bct_candidates "$ENV{ORT_INCLUDE_DIR}")
endif()
list(APPEND _bct_candidates "/usr/include/onnxruntime")

set(BCT_ORT_INCLUDE_DIR "")
foreach(_dir IN LISTS _bct_candidates)
  foreach(_sub "" "/onnxruntime" "/onnxruntime/core/session")
    _bct_ort_dir_ok("${_dir}${_sub}" _ok)
    if(_ok)
      set(BCT_ORT_INCLUDE_DIR "${_dir}${_sub}")
      set(BCT_ORT_HEADERS_SOURCE "${_dir}")
      break()
    endif()
  endforeach()
  if(BCT_ORT_INCLUDE_DIR)
    break()
  endif()
endforeach()

if(NOT BCT_ORT_INCLUDE_DIR)
  set(_root "${CMAKE_BINARY_DIR}/_ort_headers")
  set(_unpacked "${_root}/root")
  _bct_ort_dir_ok("${_unpacked}/usr/include/onnxruntime" _ok)
  if(NOT _ok)
    find_program(BCT_APT_GET apt-get)
    find_program(BCT_DPKG_DEB dpkg-deb)
    if(NOT BCT_APT_GET OR NOT BCT_DPKG_DEB)
      message(FATAL_ERROR
        "ONNX Runtime headers not found (looked at: ${_bct_candidates}) and apt-get/dpkg-deb are "
        "missing to fetch Debian's libonnxruntime-dev. Set ORT_INCLUDE_DIR to a directory holding "
        "onnxruntime_c_api.h and onnxruntime_cxx_api.h.")
    endif()
    set(_apt "${_root}/apt")
    file(MAKE_DIRECTORY "${_apt}/state/lists/partial" "${_apt}/cache/archives/partial"
                        "${_apt}/etc/preferences.d" "${_apt}/etc/sources.list.d" "${_apt}/debs")
    file(WRITE "${_apt}/etc/sources.list"
         "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main\n")
    file(WRITE "${_apt}/state/status" "")
    file(WRITE "${_apt}/apt.conf"
"Dir::Etc::SourceList \"${_apt}/etc/sources.list\";
Dir::Etc::SourceParts \"${_apt}/etc/sources.list.d\";
Dir::Etc::Preferences \"${_apt}/etc/preferences\";
Dir::Etc::PreferencesParts \"${_apt}/etc/preferences.d\";
Dir::State \"${_apt}/state\";
Dir::State::status \"${_apt}/state/status\";
Dir::Cache \"${_apt}/cache\";
Debug::NoLocking \"true\";
APT::Sandbox::User \"\";
")
    set(_env "APT_CONFIG=${_apt}/apt.conf")
    message(STATUS "Fetching Debian trixie libonnxruntime-dev headers into ${_root}")
    execute_process(COMMAND ${CMAKE_COMMAND} -E env ${_env} ${BCT_APT_GET} -q update
                    RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _err)
    if(NOT _rc EQUAL 0)
      message(FATAL_ERROR "apt-get update (private config ${_apt}/apt.conf) failed:\n${_out}\n${_err}\n"
                          "Set ORT_INCLUDE_DIR to ONNX Runtime's include directory instead.")
    endif()
    execute_process(COMMAND ${CMAKE_COMMAND} -E env ${_env} ${BCT_APT_GET} -q download libonnxruntime-dev
                    WORKING_DIRECTORY "${_apt}/debs"
                    RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _err)
    if(NOT _rc EQUAL 0)
      message(FATAL_ERROR "apt-get download libonnxruntime-dev failed:\n${_out}\n${_err}")
    endif()
    file(GLOB _debs "${_apt}/debs/libonnxruntime-dev_*.deb")
    list(GET _debs 0 _deb)
    execute_process(COMMAND ${BCT_DPKG_DEB} -x "${_deb}" "${_unpacked}" RESULT_VARIABLE _rc ERROR_VARIABLE _err)
    if(NOT _rc EQUAL 0)
      message(FATAL_ERROR "dpkg-deb -x ${_deb} failed:\n${_err}")
    endif()
    _bct_ort_dir_ok("${_unpacked}/usr/include/onnxruntime" _ok)
    if(NOT _ok)
      message(FATAL_ERROR "${_deb} unpacked, but ${_unpacked}/usr/include/onnxruntime lacks the C/C++ API headers")
    endif()
  endif()
  set(BCT_ORT_INCLUDE_DIR "${_unpacked}/usr/include/onnxruntime")
  set(BCT_ORT_HEADERS_SOURCE "Debian trixie libonnxruntime-dev (fetched)")
endif()

file(STRINGS "${BCT_ORT_INCLUDE_DIR}/onnxruntime_c_api.h" _ver_line REGEX "^#define ORT_API_VERSION [0-9]+")
string(REGEX REPLACE "^#define ORT_API_VERSION ([0-9]+).*" "\\1" BCT_ORT_API_VERSION "${_ver_line}")
message(STATUS "ONNX Runtime headers: ${BCT_ORT_INCLUDE_DIR} (ORT_API_VERSION ${BCT_ORT_API_VERSION}, from ${BCT_ORT_HEADERS_SOURCE})")
